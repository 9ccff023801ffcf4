"""One sweep trial as a worker runs it: a ``qs4d`` subcommand in a run directory, and its result.

The payload (JSON, built by ``qs4d_np.cli.sweep``) names the ``command``, its
``argv`` (checked by the subcommand's parser before the sweep started), the
``run_dir``, the ``threads`` the trial may use and, for ``ptq``, the ``widths``
(bits per target). ``run_trial`` continues whatever the run directory holds:

* ``train``: ``qs4d train ... --out RUN_DIR``, with ``--resume`` when the directory
  holds a checkpoint (a retry after a lost worker, a rerun after a killed sweep:
  the trainer's exact resume), nothing at all when the run finished
  (``results.json`` and ``best_model`` written).
* ``ptq``: the float ``--checkpoint`` quantized at ``widths`` (one target or
  several) by ``qs4d ptq``'s protocol (``train.ptq.ptq``: static activation and
  state ranges from ``--calib-batches`` training batches), evaluated on the
  validation and test sets; the quantized model is saved as ``RUN_DIR/best_model``,
  so ``qs4d eval`` / ``qs4d metrics`` read it like a trained run.
* ``eval``: ``qs4d eval ... --out RUN_DIR/eval.json``.

The result (JSON): ``method``, ``test_acc``, ``val_acc`` (None where the command
has none), ``bits`` per target, ``ace`` / ``model_size_bits`` / ``adc`` (the QS4D
formulas of ``qs4d metrics``) and ``run_dir``. The command's output goes to
``RUN_DIR/trial.log`` (appended, one header line per attempt).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from qs4d_np.cli.common import (check_model_fits, data_settings, load_data, load_model, quant_config,
                                run_info)
from qs4d_np.data.loader import BatchIterator
from qs4d_np.hardware.datapath import QUANT_TARGETS, bit_widths, metrics_table
from qs4d_np.io import atomic_write_json, load_json
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.config import QuantConfig
from qs4d_np.train.ptq import PTQ_TARGET_OPTIONS, ptq
from qs4d_np.train.evaluate import evaluate_model

LOG = "trial.log"
RESULTS = "results.json"


class TrialFailed(RuntimeError):
    """The trial's command refused or failed; the message is its error line."""


@dataclasses.dataclass(frozen=True)
class TrialCommand:
    """What a sweep needs to know of a subcommand: the module registering its parser, the keys the
    sweep sets itself, those that name files (made absolute for the workers), the keys that must
    hold one value per trial."""

    name: str
    module: str
    reserved: tuple[str, ...]
    path_keys: tuple[str, ...]
    single: tuple[str, ...] = ()


TRIAL_COMMANDS = {
    "train": TrialCommand("train", "train", ("out", "resume"), ("data_dir", "init_from")),
    "ptq": TrialCommand("ptq", "ptq", ("out",), ("data_dir", "checkpoint"), single=("bits", "targets")),
    "eval": TrialCommand("eval", "evaluate", ("out",), ("data_dir", "checkpoint", "analog")),
}


def command_parser(name: str) -> argparse.ArgumentParser:
    """A fresh parser of ``qs4d NAME`` (the one the command line uses)."""
    root = argparse.ArgumentParser(prog="qs4d")
    subparsers = root.add_subparsers()
    importlib.import_module(f"qs4d_np.cli.{TRIAL_COMMANDS[name].module}").register(subparsers)
    return subparsers.choices[name]


def trial_quant(command: str, args: argparse.Namespace, widths: dict[str, int] | None) -> QuantConfig | None:
    """The quantization a trial's model gets: for ``ptq`` 2**b states per target of ``widths`` on the
    parsed ``--grid`` / ``--granularity`` with PTQ's static ranges; for ``train`` its ``--*_quant``
    flags (None: float)."""
    if command != "ptq":
        return quant_config(args)
    levels = {t: 2 ** b for t, b in (widths or {}).items()}
    return QuantConfig(levels.pop("all", None), grid=args.grid, per_channel=args.granularity == "channel",
                       target_options=PTQ_TARGET_OPTIONS, **levels)


def model_costs(model: S4DModel) -> dict[str, Any]:
    """Bits per target (layer 0; 32 = float) and the QS4D formulas' ACE, size and ADC of ``model``
    at its quantization, as ``qs4d metrics`` computes them."""
    learn_B = bool(model.config.get("learn_B", False))
    layers = [bit_widths(model.quant, i, learn_B=learn_B) for i in range(len(model.blocks))]
    formulas = metrics_table(model, layers)["formulas"]
    return {"bits": {target: getattr(layers[0], field) for field, target in QUANT_TARGETS.items()},
            **{key: formulas[key]["quantized"] for key in ("ace", "model_size_bits", "adc")}}


class _Tee:
    """A text stream writing to the log and keeping the last line, for the error message."""

    def __init__(self, log: TextIO):
        self.log, self.last = log, ""

    def write(self, text: str) -> int:
        lines = [line for line in text.replace("\r", "\n").split("\n") if line.strip()]
        if lines:
            self.last = lines[-1]
        return self.log.write(text)

    def flush(self) -> None:
        self.log.flush()


def _cli(argv: list[str], errors: _Tee) -> None:
    from qs4d_np.cli.main import main
    print("qs4d " + " ".join(argv), flush=True)
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse; the argv was checked, so only a changed parser gets here
        status = exc.code if isinstance(exc.code, int) else 2
    if status:
        raise TrialFailed(f"qs4d {argv[0]} exited with status {status}: {errors.last}")


def _finished(run_dir: Path, *files: str) -> bool:
    return all((run_dir / f).is_file() for f in files)


def _train(payload: dict[str, Any], run_dir: Path, errors: _Tee) -> dict[str, Any]:
    if not _finished(run_dir, RESULTS, "best_model.json"):
        resume = ["--resume"] if (run_dir / "last.json").is_file() else []
        _cli(["train", *payload["argv"], "--out", str(run_dir), *resume], errors)
    results = load_json(run_dir / RESULTS)
    model = load_model(run_dir)
    return {"method": "float" if model.quant is None else "qat", "test_acc": results.get("test_acc"),
            "val_acc": results["best_val_acc"], "best_epoch": results["best_epoch"], **model_costs(model)}


def _ptq(payload: dict[str, Any], run_dir: Path, errors: _Tee) -> dict[str, Any]:
    if not _finished(run_dir, RESULTS, "best_model.json"):
        from qs4d_np.cli.ptq import calibration_batches
        args = command_parser("ptq").parse_args([*payload["argv"], "--out", str(run_dir)])
        source = load_model(args.checkpoint)
        task = load_data(data_settings(args, run_info(args.checkpoint).get("data")))
        check_model_fits(source, task, f"--checkpoint {args.checkpoint}")
        model = ptq(source, trial_quant("ptq", args, payload["widths"]),
                    calibration_batches(task.train, args.batch_size, args.calib_batches), args.mode)
        scores = {split: evaluate_model(model, BatchIterator(data, args.batch_size), mode=args.mode)["acc"]
                  for split, data in (("val", task.val), ("test", task.test))}
        model.save(run_dir / "best_model")
        atomic_write_json(run_dir / RESULTS, {"widths": payload["widths"], "checkpoint": str(args.checkpoint),
                                              "mode": args.mode, "val_acc": scores["val"],
                                              "test_acc": scores["test"], "task": task.name})
    results = load_json(run_dir / RESULTS)
    return {"method": "ptq", "test_acc": results["test_acc"], "val_acc": results["val_acc"],
            **model_costs(load_model(run_dir))}


def _eval(payload: dict[str, Any], run_dir: Path, errors: _Tee) -> dict[str, Any]:
    if not _finished(run_dir, "eval.json"):
        _cli(["eval", *payload["argv"], "--out", str(run_dir / "eval.json")], errors)
    result = load_json(run_dir / "eval.json")
    accuracy = {"test_acc": None, "val_acc": None, f"{result['split']}_acc": result["accuracy"]}
    return {"method": "eval", **accuracy, **model_costs(load_model(result["checkpoint"]))}


RUNNERS: dict[str, Callable[[dict[str, Any], Path, _Tee], dict[str, Any]]] = {
    "train": _train, "ptq": _ptq, "eval": _eval}


@contextlib.contextmanager
def thread_limits(threads: int | None) -> Iterator[None]:
    """Numba and the BLAS on at most ``threads`` threads (None: as they are)."""
    if threads is None:
        yield
        return
    import numba
    from threadpoolctl import threadpool_limits
    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        numba.set_num_threads(previous)


def run_trial(payload: dict[str, Any]) -> dict[str, Any]:
    """Run (or finish, or just read) one trial; the function a sweep submits to its workers."""
    run_dir = Path(payload["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOG, "a", encoding="utf-8") as log, thread_limits(payload.get("threads")):
        log.write(f"== attempt {payload.get('attempt')} on {socket.gethostname()} pid {os.getpid()}: "
                  f"qs4d {payload['command']} {' '.join(payload['argv'])}\n")
        log.flush()
        tee = _Tee(log)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(tee):
            result = RUNNERS[payload["command"]](payload, run_dir, tee)
    return {**result, "run_dir": str(run_dir)}
