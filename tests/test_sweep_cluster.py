"""qs4d sweep / search on real Dask clusters: results, lost workers, Ctrl-C, killed sweeps, search budgets.

Tiny runs (1 layer, H = N = 8, 200 training samples, 3 epochs: ~1 s a trial once warm). The sweep runs
as its own process, as a user starts it, against either a 2-worker cluster this module starts (its
workers stay warm between tests) or, where the test is about the sweep owning its workers (Ctrl-C,
killing everything), its own local cluster. The reference results come from ``qs4d train`` run
trial by trial with the same thread settings as the workers (one thread: Numba and BLAS).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from qs4d_np.cli.main import main  # noqa: E402
from qs4d_np.io import load_json  # noqa: E402
from qs4d_np.sweep.engine import EngineConfig, connect, thread_environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = {"limit_train": 200, "limit_test": 50, "epochs": 3, "d_model_m": 8, "d_state": 8, "n_layers_m": 1}
AXES = {"all_quant": [16, 256], "seed": [0, 1]}
FLAGS = {"limit_train": "--limit-train", "limit_test": "--limit-test"}  # the others are --KEY
ENV = {**os.environ, "PYTHONPATH": str(ROOT), **thread_environment(1)}
POINTS = [(q, s) for q in AXES["all_quant"] for s in AXES["seed"]]


def _train_argv(settings: dict) -> list[str]:
    return [w for k, v in settings.items() for w in (FLAGS.get(k, f"--{k}"), str(v))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """(all_quant, seed) -> (test_acc, best_val_acc) of `qs4d train` run for each trial, one by one,
    on one Numba and one BLAS thread like the workers."""
    import numba
    from threadpoolctl import threadpool_limits

    folder = tmp_path_factory.mktemp("one_by_one")
    results, threads = {}, numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            for q, s in POINTS:
                run = folder / f"q{q}-s{s}"
                assert main(["train", *_train_argv({**BASE, "all_quant": q, "seed": s}), "--quiet",
                             "--out", str(run)]) == 0
                results[q, s] = (load_json(run / "results.json")["test_acc"],
                                 load_json(run / "results.json")["best_val_acc"])
    finally:
        numba.set_num_threads(threads)
    return results


@pytest.fixture(scope="module")
def scheduler() -> str:
    """The address of a 2-worker local cluster (the engine's own, as `qs4d sweep` makes it)."""
    with connect(EngineConfig(workers=2)) as client:
        yield client.scheduler.address


def _spec(folder: Path, **changes) -> Path:
    path = folder / "spec.json"
    path.write_text(json.dumps({"command": "train", "base": BASE, "axes": AXES, **changes}))
    return path


def _terminal_signals() -> None:
    # as started from a terminal: a test run launched in the background of a non-interactive shell (`make
    # test &`) inherits SIGINT ignored, and Python then leaves it ignored, so Ctrl-C would never arrive
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _sweep(spec: Path, out: Path, *engine: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qs4d_np.cli.main", "sweep", str(spec), "--out", str(out),
                             "--quiet", *engine], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_terminal_signals)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _results(out: Path) -> dict:
    rows = load_json(out / "results.json")["rows"]
    assert [r["status"] for r in rows] == ["done"] * len(POINTS)
    return {(r["all_quant"], r["seed"]): (r["test_acc"], r["val_acc"]) for r in rows}


def _wait(condition, proc: subprocess.Popen, timeout: float = 90, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (status {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _trials(out: Path) -> list[Path]:
    return sorted((out / "trials").glob("train-*")) if (out / "trials").is_dir() else []


def _mid_trial(out: Path) -> Path | None:
    """A trial with a checkpoint of epoch 1 and no results yet (killing its worker now is mid-trial)."""
    for run in _trials(out):
        try:
            if not (run / "results.json").exists() and load_json(run / "last.json")["epoch"] == 1:
                return run
        except (FileNotFoundError, ValueError):  # not written yet
            continue
    return None


def _done(out: Path) -> list[Path]:
    return [run for run in _trials(out) if (run / "results.json").is_file()]


def test_sweep_equals_its_trials_run_one_by_one(tmp_path, scheduler, reference, capsys):
    spec, out = _spec(tmp_path), tmp_path / "sweep"
    status, stdout, err = _finish(_sweep(spec, out, "--scheduler", scheduler))
    assert status == 0, err
    assert _results(out) == reference
    rows = load_json(out / "results.json")["rows"]
    # every trial is a qs4d run directory; its costs are those `qs4d metrics` prints for it
    for row in rows:
        assert main(["metrics", "--checkpoint", row["run_dir"], "--json"]) == 0
        formulas = json.loads(capsys.readouterr().out)["formulas"]
        assert (row["ace"], row["model_size_bits"], row["adc"]) == tuple(
            formulas[k]["quantized"] for k in ("ace", "model_size_bits", "adc"))
        assert row["bits_A"] == row["bits_state"] == {16: 4, 256: 8}[row["all_quant"]]
    assert (out / "accuracy_vs_bits.png").stat().st_size > 0
    assert (out / "results.csv").read_text().splitlines()[0].startswith("trial,all_quant,seed,status,method")
    # the same command again: nothing left to run, nothing retrained
    stamps = {r["run_dir"]: os.stat(Path(r["run_dir"]) / "best_model.npz").st_mtime_ns for r in rows}
    assert main(["sweep", str(spec), "--out", str(out), "--quiet"]) == 0
    assert "4 finished, 0 to run" in capsys.readouterr().out
    assert stamps == {d: os.stat(Path(d) / "best_model.npz").st_mtime_ns for d in stamps}
    # another spec on this directory is refused, naming what changed
    manifest = (out / "sweep.json").read_bytes()
    changed = _spec(tmp_path, axes={**AXES, "seed": [0, 1, 2]})
    assert main(["sweep", str(changed), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "was made for another sweep" in err and "axes.seed: [0, 1] recorded, [0, 1, 2] now" in err
    assert (out / "sweep.json").read_bytes() == manifest


def test_a_killed_worker_process_costs_a_retry_not_the_results(tmp_path, scheduler, reference):
    spec, out = _spec(tmp_path), tmp_path / "sweep"
    proc = _sweep(spec, out, "--scheduler", scheduler)
    _wait(lambda: _mid_trial(out) is not None, proc, what="a trial's first epoch")
    victim = _mid_trial(out)
    header = [line for line in (victim / "trial.log").read_text().splitlines() if line.startswith("== attempt")][-1]
    os.kill(int(header.split(" pid ")[1].split(":")[0]), signal.SIGKILL)  # the worker process running it
    status, _, err = _finish(proc)
    assert status == 0, err
    assert _results(out) == reference
    entry = load_json(out / "sweep.json")["trials"][victim.name]
    assert entry["attempts"] == 2
    log = (victim / "trial.log").read_text()
    assert log.count("== attempt") == 2 and "--resume" in log.split("== attempt 2")[1]  # from its checkpoint


def test_ctrl_c_then_a_killed_sweep_then_a_rerun(tmp_path, scheduler, reference):
    spec, out = _spec(tmp_path), tmp_path / "sweep"
    engine = ("--workers", "2")
    proc = _sweep(spec, out, *engine)
    _wait(lambda: _mid_trial(out) is not None, proc, what="a trial's first epoch")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    status, _, err = _finish(proc, timeout=60)
    assert status == 130, err
    assert "interrupted" in err and "Rerun the same command" in err and "Traceback" not in err
    finished = {run.name: os.stat(run / "best_model.npz").st_mtime_ns for run in _done(out)}
    manifest = load_json(out / "sweep.json")
    assert {n for n, t in manifest["trials"].items() if t["status"] == "done"} <= set(finished)
    # rerun, then kill everything (driver and workers) in the middle of a trial
    proc = _sweep(spec, out, *engine)
    _wait(lambda: _mid_trial(out) is not None, proc, what="a trial's first epoch")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished.update({run.name: os.stat(run / "best_model.npz").st_mtime_ns
                     for run in _done(out) if run.name not in finished})
    # the killed workers went with it (one process group), so another cluster may finish the sweep
    status, stdout, err = _finish(_sweep(spec, out, "--scheduler", scheduler))
    assert status == 0, err
    assert _results(out) == reference
    assert finished == {name: os.stat(out / "trials" / name / "best_model.npz").st_mtime_ns for name in finished}
    assert len(finished) < len(POINTS)  # something was left to do after the kills
    assert any("--resume" in (run / "trial.log").read_text() for run in _trials(out))


def test_unreachable_scheduler_fails_within_seconds(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    status, _, err = _finish(_sweep(_spec(tmp_path), tmp_path / "sweep", "--scheduler", f"tcp://127.0.0.1:{port}",
                                    "--connect-timeout", "2"), timeout=60)
    took = time.monotonic() - start
    assert status == 1 and f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port} within 2 s" in err, err
    assert "Traceback" not in err
    assert took < 15, took  # 2 s of connecting plus the interpreter's start


@pytest.fixture(scope="module")
def float_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("float") / "run"
    argv = ["train", *_train_argv({**BASE, "epochs": 2}), "--quiet", "--out", str(run)]
    subprocess.run([sys.executable, "-m", "qs4d_np.cli.main", *argv], env=ENV, check=True, capture_output=True)
    return run


def test_ptq_trials_equal_qs4d_ptq(tmp_path, scheduler, float_run, capsys):
    spec = tmp_path / "ptq.json"
    spec.write_text(json.dumps({"command": "ptq", "base": {"checkpoint": str(float_run), "limit_test": 50},
                                "axes": {"targets": ["A", "all"], "bits": [3, 6]}}))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "sweep"), "--scheduler", scheduler, "--quiet"]) == 0
    capsys.readouterr()
    rows = load_json(tmp_path / "sweep" / "results.json")["rows"]
    assert main(["ptq", "--checkpoint", str(float_run), "--targets", "A", "all", "--bits", "3", "6",
                 "--limit-test", "50", "--out", str(tmp_path / "ptq")]) == 0
    expected = {(r["target"], r["bits"]): r["accuracy"] for r in load_json(tmp_path / "ptq" / "ptq.json")["ptq"]}
    assert {(r["targets"], r["bits"]): r["test_acc"] for r in rows} == expected
    assert all(r["method"] == "ptq" and r["val_acc"] is not None for r in rows)


def test_search_meets_its_budget(tmp_path, scheduler, float_run, capsys):
    out = tmp_path / "search"
    argv = ["search", "--checkpoint", str(float_run), "--budget", "ace=60x", "--targets", "A", "C", "state", "act",
            "--start-bits", "4", "--min-bits", "2", "--base", '{"limit_test": 50}', "--out", str(out),
            "--scheduler", scheduler, "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = load_json(out / "search.json")
    assert result["cost"] <= result["limit"] == result["float_cost"] / 60
    path = result["path"]
    assert len(path) >= 2 and path[-2]["cost"] > result["limit"]  # it stopped at the first point in budget
    for before, after in zip(path, path[1:]):
        assert after["cost"] < before["cost"]
        chosen = next(c for c in after["candidates"] if c["target"] == after["move"]["target"])
        top = max(c["score"] for c in after["candidates"])  # best accuracy change per cost saved,
        assert chosen["score"] == top  # ties to the larger saving
        assert chosen["saved"] == max(c["saved"] for c in after["candidates"] if c["score"] == top)
    # the chosen model is a qs4d run whose `qs4d metrics` ACE is the cost the search counted
    assert main(["metrics", "--checkpoint", result["run_dir"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["formulas"]["ace"]["quantized"] == result["cost"]
    line = next(l for l in printed.splitlines() if l.startswith("chosen widths: "))
    assert dict(w.split("=") for w in line.split(": ")[1].split()) == {t: str(b) for t, b in result["widths"].items()}
    assert (out / "search.png").stat().st_size > 0
