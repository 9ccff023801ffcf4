"""Accuracy under test-time noise for a float model and QAT models at several widths (sMNIST, offline data).

Trains a small float model on the offline 5k MNIST subset with ``qs4d train``
(or takes ``--checkpoint``), fine-tunes QAT copies at each ``--bits`` width
from it (``--init-from``, the QS4D recipe), then sweeps three kinds of
test-time noise (``qs4d_np.hardware.robustness``): Gaussian noise on A
relative to its range (the QS4D protocol, real and imaginary parts apart),
noise on every analog weight relative to its max |w|, and crossbar read
noise on the IMSSA mapping (``--read-samples`` test digits; slow: a
784-step analog recurrence). Each point is the mean over ``--seeds`` noise
draws with the std as error bar. Saves the figure (``--json PATH``: the numbers too)::

    .venv/bin/python examples/noise_robustness.py       # ~1 hour on 2 cores at load ~9 (the read sweep: 42 min)
    .venv/bin/python examples/noise_robustness.py --checkpoint runs/float --bits 4 6 --epochs 0

Noise reaches the latent weights; a QAT model quantizes them afterwards (as
in training with noise), so noise below half a quantization step of a
coarse grid can be rounded away.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qs4d_np.cli.common import load_model
from qs4d_np.cli.main import main as qs4d
from qs4d_np.data.tasks import load_task
from qs4d_np.hardware.robustness import KINDS, noise_sweep
from qs4d_np.io import atomic_write_json

SIGMAS = {"A": [0.0, 0.01, 0.02, 0.03, 0.05], "weights": [0.0, 0.02, 0.05, 0.1, 0.2],
          "read": [0.0, 0.01, 0.02, 0.05]}
LABELS = {"A": "noise on A: sigma / value range [%]", "weights": "noise on every weight: sigma / max|w| [%]",
          "read": "crossbar read noise: w_noise / g_max [%]"}


def train_models(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """Run directories: the float model and one QAT fine-tune per width."""
    common = ["--dataset", "smnist", "--preset", "qs4d", "--quiet", "--batch_size", "64", "--seed", str(args.seed)]
    if args.limit_train:
        common += ["--limit-train", str(args.limit_train)]
    runs: dict[str, Path] = {}
    if args.checkpoint is not None:
        runs["float"] = Path(args.checkpoint)
    else:
        runs["float"] = work / "float"
        shape = ["--n_layers_m", str(args.n_layers), "--d_model_m", str(args.d_model), "--d_state", str(args.d_state)]
        if qs4d(["train", *common, *shape, "--epochs", str(args.epochs), "--lr", "0.01", "--out",
                 str(runs["float"])]):
            raise SystemExit("training the float model failed")
    for bits in args.bits:
        out = work / f"qat{bits}"
        if qs4d(["train", *common, "--init-from", str(runs["float"]), "--all_quant", str(2 ** bits),
                 "--epochs", str(args.qat_epochs), "--lr", "0.002", "--out", str(out)]):
            raise SystemExit(f"QAT fine-tuning at {bits} bits failed")
        runs[f"QAT {bits} bit"] = out
    return runs


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results["sweeps"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for name, curve in results["sweeps"][kind].items():
            ax.errorbar(np.array(curve["sigma"]) * 100, np.array(curve["mean"]) * 100,
                        yerr=np.array(curve["std"]) * 100, marker="o", capsize=3, label=name)
        ax.set_xlabel(LABELS[kind])
        if kind == "read":
            ax.set_title(f"IMSSA mapping, {results['read_samples']} test digits", fontsize=9)
        ax.set_ylabel("test accuracy [%]")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"sMNIST ({results['test_samples']} test digits), mean +- std over {results['seeds']} seeds")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a float run directory or model (skips training)")
    parser.add_argument("--bits", type=int, nargs="*", default=[4, 8], help="QAT widths")
    parser.add_argument("--epochs", type=int, default=4, help="float training epochs")
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--d_model", type=int, default=32)
    parser.add_argument("--d_state", type=int, default=16)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--read-samples", type=int, default=100, help="test digits for the (slow) read-noise sweep")
    parser.add_argument("--kinds", nargs="*", choices=KINDS, default=list(KINDS))
    parser.add_argument("--workdir", default=None, help="keep the training runs here (default: a temp folder)")
    parser.add_argument("--limit-train", type=int, default=None, help="train on the first N digits (smoke runs)")
    parser.add_argument("--out", default="runs/figures/noise_robustness.png", help="figure (runs/ is ignored by git)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        runs = train_models(args, work)
        models = {name: load_model(path) for name, path in runs.items()}
        task = load_task("smnist")
        x, y = task.test.batch(np.arange(min(args.test_samples, len(task.test))))
        results: dict[str, Any] = {"test_samples": len(y), "read_samples": min(args.read_samples, len(y)),
                                   "seeds": args.seeds, "sweeps": {},
                                   "runs": {k: str(v) for k, v in runs.items()}}
        for kind in args.kinds:
            n = args.read_samples if kind == "read" else len(y)
            t0 = time.perf_counter()
            results["sweeps"][kind] = noise_sweep(models, x[:n], y[:n], kind, SIGMAS[kind], seeds=args.seeds,
                                                  seed=args.seed, batch_size=256 if kind != "read" else n)
            print(f"{kind}: {time.perf_counter() - t0:.0f} s")
            for name, curve in results["sweeps"][kind].items():
                print(f"  {name:>12}: " + ", ".join(f"{s:g}: {m * 100:.1f}+-{d * 100:.1f}%" for s, m, d in
                                                    zip(curve["sigma"], curve["mean"], curve["std"])))
        results["seconds"] = time.perf_counter() - start
        out = Path(args.out)
        plot(results, out)
        if args.json:
            atomic_write_json(args.json, results)
    print(f"saved {out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
