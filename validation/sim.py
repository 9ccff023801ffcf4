"""Run the RTL of the SSM core against a golden vector directory (Icarus Verilog, cocotb).

    python validation/sim.py VECTOR_DIR            # iverilog + vvp on tb_s4d_ssm_core.v
    python validation/sim.py VECTOR_DIR --cocotb   # the cocotb test, golden model in Python

The vector directory comes from ``qs4d_np.golden.write_ssm_vectors``; the
testbench writes its outputs to VECTOR_DIR/rtl/ and this script then runs
``compare_dumps`` on them. Exit code 0 only when every word agrees.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RTL = HERE / "rtl"
CORE_SOURCES = [RTL / "s4d_ssm_core.v"]
TB_SOURCES = CORE_SOURCES + [RTL / "tb_s4d_ssm_core.v"]
WIDTH_PARAMS = {"u": "W_U", "Abar": "W_A", "Bbar": "W_B", "C": "W_C", "D": "W_D", "x": "W_X", "y": "W_Y"}


def missing_tools(cocotb: bool = False) -> str | None:
    """Why the RTL flow cannot run here, or None when it can."""
    for tool in ("iverilog", "vvp"):
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH (Debian: apt-get install -y iverilog)"
    if cocotb:
        try:
            import cocotb_tools.runner  # noqa: F401
        except ImportError:
            return "cocotb is not installed (pip install -e '.[rtl]')"
    return None


def core_parameters(config: dict) -> dict[str, int]:
    """The s4d_ssm_core parameters (sizes, widths, clamp ranges) of a vector config."""
    fmts = config["formats"]
    params = {"H": config["H"], "N2": config["N2"]}
    params.update({p: fmts[k]["width"] for k, p in WIDTH_PARAMS.items()})
    params.update({"X_MIN": fmts["x"]["qmin"], "X_MAX": fmts["x"]["qmax"],
                   "Y_MIN": fmts["y"]["qmin"], "Y_MAX": fmts["y"]["qmax"]})
    return params


def run_testbench(vec_dir: str | os.PathLike, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Compile tb_s4d_ssm_core for this directory's configuration and run it there.

    Returns the vvp process (returncode != 0 on any mismatch, via $fatal);
    raises RuntimeError if compilation fails.
    """
    from qs4d_np.golden.vectors import load_vector_config

    vec_dir = Path(vec_dir).resolve()
    config = load_vector_config(vec_dir)
    params = {**core_parameters(config), "NB": config["batch"], "L": config["length"]}
    (vec_dir / "rtl").mkdir(exist_ok=True)
    sim = vec_dir / "tb_s4d_ssm_core.vvp"
    cmd = ["iverilog", "-g2012", "-Wall", "-o", str(sim), "-s", "tb_s4d_ssm_core"]
    cmd += [f"-Ptb_s4d_ssm_core.{k}={v}" for k, v in params.items()]
    build = subprocess.run(cmd + [str(s) for s in TB_SOURCES], capture_output=True, text=True,
                           timeout=timeout)
    if build.returncode != 0:
        raise RuntimeError(f"iverilog failed ({build.returncode}):\n{build.stderr}")
    return subprocess.run(["vvp", "-n", str(sim)], cwd=vec_dir, capture_output=True, text=True,
                          timeout=timeout)


def run_cocotb(vec_dir: str | os.PathLike, build_dir: str | os.PathLike,
               override: dict[str, int] | None = None) -> tuple[int, int]:
    """Build the core with this directory's parameters and run validation/cocotb/test_s4d_ssm_core.py.

    ``override`` replaces core parameters (fault injection in tests). Returns
    (tests run, tests failed) from cocotb's results file.
    """
    from cocotb_tools.runner import get_results, get_runner

    from qs4d_np.golden.vectors import load_vector_config

    vec_dir = Path(vec_dir).resolve()
    build_dir = Path(build_dir).resolve()
    runner = get_runner("icarus")
    runner.build(sources=CORE_SOURCES, hdl_toplevel="s4d_ssm_core", build_dir=build_dir,
                 parameters={**core_parameters(load_vector_config(vec_dir)), **(override or {})},
                 always=True)
    # The runner hands the simulator this process's sys.path as PYTHONPATH.
    added = [str(p) for p in (HERE / "cocotb", HERE.parent) if str(p) not in sys.path]
    sys.path[:0] = added
    try:
        runner.test(hdl_toplevel="s4d_ssm_core", test_module="test_s4d_ssm_core",
                    build_dir=build_dir, test_dir=build_dir, results_xml=str(build_dir / "results.xml"),
                    extra_env={"QS4D_VECTORS": str(vec_dir)})
    except SystemExit:
        pass  # under pytest the runner exits on failing tests; the results file says which
    finally:
        del sys.path[:len(added)]
    return get_results(build_dir / "results.xml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vectors", help="vector directory written by qs4d_np.golden.write_ssm_vectors")
    parser.add_argument("--cocotb", action="store_true", help="run the cocotb test instead of the Verilog testbench")
    args = parser.parse_args(argv)
    reason = missing_tools(cocotb=args.cocotb)
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    if args.cocotb:
        run, failed = run_cocotb(args.vectors, Path(args.vectors) / "cocotb_build")
        print(f"cocotb: {run} test(s), {failed} failed")
        return int(failed != 0)
    from qs4d_np.golden.compare import compare_dumps

    proc = run_testbench(args.vectors)
    print(proc.stdout, end="")
    print(proc.stderr, end="", file=sys.stderr)
    report = compare_dumps(args.vectors, Path(args.vectors) / "rtl")
    print(report)
    return int(proc.returncode != 0 or not report.ok)


if __name__ == "__main__":
    sys.exit(main())
