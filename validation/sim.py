"""Run the RTL of the SSM core against a golden vector directory (Icarus Verilog, cocotb).

    python validation/sim.py VECTOR_DIR            # iverilog + vvp on tb_s4d_ssm_core.v
    python validation/sim.py VECTOR_DIR --cocotb   # the cocotb test, golden model in Python
    python validation/sim.py BUNDLE --layer I [--timeout S] [--work DIR]
    python validation/sim.py BUNDLE --layer I --whole-layer   # s4d_layer: the whole block

A core vector directory comes from ``qs4d_np.golden.write_ssm_vectors``. A
whole-model bundle (``qs4d golden export``; its ``stress/`` sub-bundle is one
too) is first cut down to layer I's core (``bundle_core_vectors``: its weights,
multipliers, input ``u`` and expected ``x_re``, ``x_im``, ``y`` and flags) in
``--work`` (default: ``BUNDLE.layerI.core`` next to it; with ``--whole-layer``
the whole block, ``layer_vectors``, in ``BUNDLE.layerI.whole-layer``); a previous
run's dump there is replaced. The testbench writes its
outputs to ``rtl/`` there and this script then runs ``compare_dumps`` on them.
Exit code 0 only when every word agrees, 1 on a mismatch, 2 when the flow
cannot run (no simulator, a timeout).
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


def bundle_core_vectors(bundle: str | os.PathLike, layer: int, out: str | os.PathLike) -> Path:
    """Write layer ``layer``'s SSM core of a model bundle as a core vector directory at ``out``."""
    import numpy as np

    from qs4d_np.golden.fixedpoint import IntFormat
    from qs4d_np.golden.layer import WEIGHT_FORMAT, SSMCore, SSMCoreFormats, SSMCoreTrace
    from qs4d_np.golden.vectors import load_vector_config, read_tensor, write_ssm_vectors

    bundle = Path(bundle)
    config = load_vector_config(bundle)
    _bundle_layer(config, bundle, layer)
    tensors = config["tensors"]
    p = f"layers.{layer}."

    def read(name: str) -> np.ndarray:
        if p + name not in tensors:
            raise ValueError(f"{bundle}/manifest.json lists no tensor {p + name}")
        return read_tensor(bundle, p + name, tensors[p + name])

    def fmt(name: str) -> IntFormat:
        spec = tensors[p + name]
        return IntFormat(spec["width"], spec["qmin"], spec["qmax"])

    grids = {"Abar": "Abar_re", "Bbar": "Bbar_re", "C": "C_re", "D": "D"}
    formats = SSMCoreFormats(u=fmt("u"), x=fmt("x_re"), y=fmt("y"), **{k: fmt(v) for k, v in grids.items()})
    names = tuple(WEIGHT_FORMAT) + SSMCore.REQUANT_HN + SSMCore.REQUANT_H
    core = SSMCore(formats, **{k: read(k) for k in names})
    trace = SSMCoreTrace(**{k: read(k) for k in ("x_re", "x_im", "y", "sat_x_re", "sat_x_im", "sat_y")})
    return write_ssm_vectors(out, core, read("u"), trace, layer=layer)


LAYER_SOURCES = [RTL / "s4d_ssm_core.v", RTL / "s4d_layer.v", RTL / "tb_s4d_layer.v"]
# Weight files of a layer directory: the bundle's layers.I.<name> without the prefix.
LAYER_WEIGHTS = ("Abar_re", "Abar_im", "Bbar_re", "Bbar_im", "C_re", "C_im", "D", "m_a_re", "m_a_im_to_re",
                 "m_a_im_to_im", "m_b_re", "m_b_im", "r_x", "m_c_re", "m_c_im", "m_d", "r_y", "mix_a_W", "mix_a_b",
                 "mix_a_m0", "mix_a_r", "mix_b_W", "mix_b_b", "mix_b_m0", "mix_b_r", "sig_lut", "glu_m0", "glu_r")
POST_WEIGHTS = ("post_m0", "post_offset", "post_sign", "post_r")
LAYER_OUTPUTS = ("x_re", "x_im", "sat_x_re", "sat_x_im", "y", "sat_y", "za", "sat_za", "zb", "sat_zb", "sig",
                 "act", "sat_act", "out", "sat_out")


def layer_vectors(bundle: str | os.PathLike, layer: int, out: str | os.PathLike) -> Path:
    """Write layer ``layer`` of a model bundle as a whole-layer vector directory at ``out``.

    Its weight and input files are the bundle's ``layers.I.<name>`` as ``<name>.memh``; its expected
    outputs every traced tensor of the layer; ``config.json`` (kind ``layer``) names them and the
    ``s4d_layer`` parameters (``params``).
    """
    from qs4d_np.golden.vectors import load_vector_config, read_tensor, staged_export
    from qs4d_np.io import atomic_write_json

    from qs4d_np.golden.layer import SPEC_VERSION
    from qs4d_np.golden.vectors import write_memh

    bundle = Path(bundle)
    config = load_vector_config(bundle)
    entry = _bundle_layer(config, bundle, layer)
    tensors = config["tensors"]
    p = f"layers.{layer}."
    names = LAYER_WEIGHTS + ((POST_WEIGHTS + (("post_m1",) if entry["residual"] else ())) if entry["post"] else ())
    missing = [p + n for n in names + ("u",) + LAYER_OUTPUTS if p + n not in tensors]
    if missing:
        raise ValueError(f"{bundle}/manifest.json lacks {', '.join(missing[:4])}")
    specs = {}
    with staged_export(out) as staged:
        for name in names + ("u",) + LAYER_OUTPUTS:
            spec = dict(tensors[p + name], file=f"{name}.memh", output=name in LAYER_OUTPUTS)
            write_memh(staged / spec["file"], read_tensor(bundle, p + name, tensors[p + name]), spec["width"],
                       signed=spec["signed"])
            specs[name] = spec
        t = {k: tensors[p + k] for k in ("u", "Abar_re", "Bbar_re", "C_re", "D", "x_re", "y", "mix_a_W", "za",
                                         "zb", "sig_lut", "act", "out")}
        params = {"H": entry["H"], "N2": entry["N2"], "W_U": t["u"]["width"], "W_A": t["Abar_re"]["width"],
                  "W_B": t["Bbar_re"]["width"], "W_C": t["C_re"]["width"], "W_D": t["D"]["width"],
                  "W_X": t["x_re"]["width"], "W_Y": t["y"]["width"], "X_MIN": t["x_re"]["qmin"],
                  "X_MAX": t["x_re"]["qmax"], "Y_MIN": t["y"]["qmin"], "Y_MAX": t["y"]["qmax"],
                  "W_W": t["mix_a_W"]["width"], "W_ZA": t["za"]["width"], "ZA_MIN": t["za"]["qmin"],
                  "ZA_MAX": t["za"]["qmax"], "W_ZB": t["zb"]["width"], "ZB_MIN": t["zb"]["qmin"],
                  "ZB_MAX": t["zb"]["qmax"], "W_SIG": t["sig_lut"]["width"], "W_ACT": t["act"]["width"],
                  "ACT_MIN": t["act"]["qmin"], "ACT_MAX": t["act"]["qmax"], "HAS_POST": int(entry["post"]),
                  "RESIDUAL": int(entry["residual"]), "W_OUT": t["out"]["width"], "OUT_MIN": t["out"]["qmin"],
                  "OUT_MAX": t["out"]["qmax"]}
        atomic_write_json(staged / "config.json", {
            "spec_version": SPEC_VERSION, "kind": "layer", "layer": layer, "batch": config["samples"],
            "length": config["length"], "params": params, "tensors": specs})
    return Path(out)


def _bundle_layer(config: dict, bundle: Path, layer: int) -> dict:
    if config.get("kind") not in ("model", "stress"):
        raise ValueError(f"{bundle} is not a model bundle (kind {config.get('kind')!r}); pass a core vector "
                         f"directory without --layer")
    n_layers = int(config["n_layers"])
    if not 0 <= layer < n_layers:
        raise ValueError(f"--layer {layer}: {bundle} has layers 0..{n_layers - 1}")
    return config["layers"][layer]


def run_layer_testbench(vec_dir: str | os.PathLike, timeout: float = 3600.0, seed: int = 1,
                        core: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Compile tb_s4d_layer for a ``layer_vectors`` directory and run it there (dump in rtl/).

    ``seed``: the testbench's idle/stall pattern; ``core``: another s4d_ssm_core.v (a mutant, in tests).
    """
    from qs4d_np.golden.vectors import load_vector_config

    vec_dir = Path(vec_dir).resolve()
    config = load_vector_config(vec_dir)
    params = {**config["params"], "NB": config["batch"], "L": config["length"], "SEED": seed}
    (vec_dir / "rtl").mkdir(exist_ok=True)
    sim = vec_dir / "rtl" / "tb_s4d_layer.vvp"
    sources = LAYER_SOURCES if core is None else [Path(core)] + LAYER_SOURCES[1:]
    cmd = ["iverilog", "-g2012", "-Wall", "-o", str(sim), "-s", "tb_s4d_layer"]
    cmd += [f"-Ptb_s4d_layer.{k}={v}" for k, v in params.items()]
    build = subprocess.run(cmd + [str(s) for s in sources], capture_output=True, text=True, timeout=timeout)
    if build.returncode != 0:
        raise RuntimeError(f"iverilog failed ({build.returncode}):\n{build.stderr}")
    return subprocess.run(["vvp", "-n", str(sim)], cwd=vec_dir, capture_output=True, text=True, timeout=timeout)


def run_testbench(vec_dir: str | os.PathLike, timeout: float = 3600.0,
                  core: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Compile tb_s4d_ssm_core for this directory's configuration and run it there.

    ``core``: another Verilog file of ``s4d_ssm_core`` (a mutant, in tests) instead of the reference.
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
    sources = TB_SOURCES if core is None else [Path(core), RTL / "tb_s4d_ssm_core.v"]
    build = subprocess.run(cmd + [str(s) for s in sources], capture_output=True, text=True,
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


def _clear_previous_run(work: Path) -> None:
    """Remove what a previous sim.py run left in its own work directory (the dump and the compiled
    simulation), so the vectors can be rewritten; any other directory is left to staged_export."""
    if (work / "config.json").is_file():
        if (work / "rtl").is_dir():
            shutil.rmtree(work / "rtl")
        for leftover in ("tb_s4d_ssm_core.vvp",):
            (work / leftover).unlink(missing_ok=True)
        if (work / "cocotb_build").is_dir():
            shutil.rmtree(work / "cocotb_build")


def run_cocotb_layer(vec_dir: str | os.PathLike, build_dir: str | os.PathLike, seed: int = 1,
                     core: str | os.PathLike | None = None) -> tuple[int, int]:
    """Build s4d_layer for a ``layer_vectors`` directory and run validation/cocotb/test_s4d_layer.py.

    ``seed``: the idle/stall pattern; ``core``: another s4d_ssm_core.v (a mutant, in tests).
    Returns (tests run, tests failed).
    """
    from cocotb_tools.runner import get_results, get_runner

    from qs4d_np.golden.vectors import load_vector_config

    vec_dir = Path(vec_dir).resolve()
    build_dir = Path(build_dir).resolve()
    sources = LAYER_SOURCES[:2] if core is None else [Path(core), LAYER_SOURCES[1]]
    runner = get_runner("icarus")
    runner.build(sources=sources, hdl_toplevel="s4d_layer", build_dir=build_dir,
                 parameters=load_vector_config(vec_dir)["params"], always=True)
    added = [str(p) for p in (HERE / "cocotb", HERE.parent) if str(p) not in sys.path]
    sys.path[:0] = added
    try:
        runner.test(hdl_toplevel="s4d_layer", test_module="test_s4d_layer", build_dir=build_dir,
                    test_dir=build_dir, results_xml=str(build_dir / "results.xml"),
                    extra_env={"QS4D_VECTORS": str(vec_dir), "QS4D_SEED": str(seed)})
    except SystemExit:
        pass  # under pytest the runner exits on failing tests; the results file says which
    finally:
        del sys.path[:len(added)]
    return get_results(build_dir / "results.xml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vectors", help="core vector directory (write_ssm_vectors) or, with --layer, a bundle "
                                        "written by 'qs4d golden export' (or its stress/ sub-bundle)")
    parser.add_argument("--layer", type=int, default=None, metavar="I", help="the bundle's layer to simulate")
    parser.add_argument("--work", default=None, metavar="DIR",
                        help="where layer I's core vectors and the RTL dump go (default: BUNDLE.layerI)")
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                        help="seconds allowed for the compile and for the simulation, each (default 3600)")
    parser.add_argument("--whole-layer", action="store_true",
                        help="with --layer: simulate the whole block (s4d_layer: core, mixing, sigmoid table, GLU, "
                             "post op) through its valid/ready interface instead of the SSM core")
    parser.add_argument("--cocotb", action="store_true", help="run the cocotb test instead of the Verilog testbench")
    args = parser.parse_args(argv)
    if args.whole_layer and args.layer is None:
        parser.error("--whole-layer needs --layer I")
    reason = missing_tools(cocotb=args.cocotb)
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    from qs4d_np.golden.compare import compare_dumps

    vectors = Path(args.vectors)
    try:
        if args.layer is not None:
            what = "whole-layer" if args.whole_layer else "core"
            work = Path(args.work) if args.work else vectors.with_name(f"{vectors.name}.layer{args.layer}.{what}")
            _clear_previous_run(work)
            make = layer_vectors if args.whole_layer else bundle_core_vectors
            vectors = make(vectors, args.layer, work)
            print(f"layer {args.layer}'s {what} vectors: {vectors}")
        if args.cocotb:
            cocotb_run = run_cocotb_layer if args.whole_layer else run_cocotb
            run, failed = cocotb_run(vectors, vectors / "cocotb_build")
            print(f"cocotb: {run} test(s), {failed} failed")
            return int(failed != 0)
        run = run_layer_testbench if args.whole_layer else run_testbench
        proc = run(vectors, timeout=args.timeout)
        print(proc.stdout, end="")
        print(proc.stderr, end="", file=sys.stderr)
        report = compare_dumps(vectors, vectors / "rtl")
    except subprocess.TimeoutExpired as exc:
        print(f"sim.py: error: {exc.cmd[0]} did not finish within --timeout {args.timeout:g} s", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"sim.py: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, RuntimeError) else 1
    print(report.summary())
    return int(proc.returncode != 0 or not report.ok)


if __name__ == "__main__":
    sys.exit(main())
