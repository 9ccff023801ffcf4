"""Structured pruning of a small sMNIST model: accuracy and hardware cost vs sparsity (offline data).

Trains a small float model on the offline 5k MNIST subset with ``qs4d train``
(or takes ``--checkpoint``), then prunes whole SSM modes and whole channels
(``qs4d_np.hardware.pruning.prune``): by magnitude at fixed sparsities (the same
fraction in every layer), greedily under accuracy budgets (validation
digits decide, test digits report; per-layer fractions printed), and with the
QS4D reference's protocol (``method="qs4d"``: every kernel tried once, kept
pruned iff validation accuracy stays >= baseline - 1 point). No fine-tuning
after pruning (``qs4d prune --finetune-epochs`` does that). Saves two figures: accuracy vs sparsity (magnitude
vs greedy) and the counted datapath cost vs sparsity (bits stored, ADC
conversions, bit-weighted MACs at ``--bits``, relative to the unpruned model)::

    .venv/bin/python examples/pruning.py                         # ~5 minutes on 2 busy cores
    .venv/bin/python examples/pruning.py --checkpoint runs/float --out-prefix /tmp/pruning
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
from qs4d_np.hardware.datapath import model_datapath
from qs4d_np.hardware.metrics import BitWidths, count_datapath
from qs4d_np.hardware.pruning import prune, prune_magnitude
from qs4d_np.io import atomic_write_json

SPARSITIES = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875]
TOLERANCES = [0.0, 0.01, 0.02, 0.05, 0.1]
GRANULARITIES = ("mode", "channel")
METHODS = {"mode": "modes", "channel": "channels"}  # prune()'s greedy method per granularity
COSTS = {"bits_stored": "bits stored", "adc_conversions": "ADC conversions", "bit_ops": "bit-weighted MACs"}


def accuracy(model: Any, x: np.ndarray, y: np.ndarray, batch_size: int = 250) -> float:
    correct = sum(int(np.count_nonzero(np.argmax(model.forward(x[i:i + batch_size]), axis=1) == y[i:i + batch_size]))
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


def costs(model: Any, bits: int) -> dict[str, int]:
    counted = count_datapath(model_datapath(model, BitWidths.uniform(bits)))
    return {key: int(getattr(counted, key)) for key in COSTS}


def study(model: Any, val: tuple, test: tuple, args: argparse.Namespace) -> dict[str, Any]:
    clean = {k: v.copy() for k, v in model.params.items()}

    def restore() -> None:
        for k, v in model.params.items():
            v[...] = clean[k]

    base_cost = costs(model, args.bits)
    out: dict[str, Any] = {"base_accuracy": accuracy(model, *test), "base_cost": base_cost, "magnitude": {},
                           "greedy": {}}
    for g in GRANULARITIES:
        rows = []
        for s in SPARSITIES:
            masks = prune_magnitude(model, s, g)
            masks.apply(model)
            rows.append({"sparsity": masks.sparsity, "accuracy": accuracy(model, *test),
                         "cost": {k: v / base_cost[k] for k, v in costs(model, args.bits).items()}})
            restore()
        out["magnitude"][g] = rows
        rows = []
        for tol in TOLERANCES:
            result = prune(model, *val, METHODS[g], tolerance=tol, chunk=args.chunk, batch_size=250)
            result.apply(model)
            rows.append({"tolerance": tol, "sparsity": result.masks.sparsity, "accuracy": accuracy(model, *test),
                         "val_accuracy": result.accuracy, "per_layer": result.masks.fractions(),
                         "evaluations": result.evaluations,
                         "cost": {k: v / base_cost[k] for k, v in costs(model, args.bits).items()}})
            restore()
            print(f"greedy {g:>7} tol {tol:.2f}: sparsity {rows[-1]['sparsity']:.3f}, test acc "
                  f"{rows[-1]['accuracy'] * 100:.1f}%, per layer "
                  + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1]["per_layer"].items()))
        out["greedy"][g] = rows
    result = prune(model, *val, "qs4d", tolerance=0.01, batch_size=250)
    result.apply(model)
    out["qs4d"] = {"tolerance": 0.01, "accuracy": accuracy(model, *test), "val_accuracy": result.accuracy,
                   "kernel_fractions": [e["kernel_fraction"] for e in result.layers],
                   "evaluations": result.evaluations, "seconds": result.seconds,
                   "cost": {k: v / base_cost[k] for k, v in costs(model, args.bits).items()}}
    restore()
    print(f"qs4d protocol, 1 point: kernels pruned per layer {out['qs4d']['kernel_fractions']}, test acc "
          f"{out['qs4d']['accuracy'] * 100:.1f}% ({result.evaluations} evaluations)")
    return out


def plot(res: dict[str, Any], prefix: Path, bits: int) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for g, color in zip(GRANULARITIES, ("C0", "C1")):
        for method, marker, style in (("magnitude", "o", "-"), ("greedy", "s", "--")):
            rows = sorted(res[method][g], key=lambda r: r["sparsity"])
            ax.plot([r["sparsity"] * 100 for r in rows], [r["accuracy"] * 100 for r in rows], style,
                    marker=marker, color=color, label=f"{g}s, {method}")
    ax.axhline(res["base_accuracy"] * 100, color="gray", lw=0.8, ls=":", label="unpruned")
    ax.set_xlabel("pruned fraction of modes / channels [%]")
    ax.set_ylabel("test accuracy [%]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("sMNIST: magnitude vs greedy pruning (no fine-tuning)")
    fig.tight_layout()
    paths = [prefix.with_name(prefix.name + "_accuracy.png")]
    fig.savefig(paths[0], dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, g in zip(axes, GRANULARITIES):
        rows = res["magnitude"][g]
        for key, label in COSTS.items():
            ax.plot([r["sparsity"] * 100 for r in rows], [r["cost"][key] * 100 for r in rows], marker="o",
                    label=label)
        ax.set_title(f"magnitude pruning of {g}s")
        ax.set_xlabel("pruned fraction [%]")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"counted datapath cost, % of unpruned ({bits}-bit)")
    axes[0].legend()
    fig.tight_layout()
    paths.append(prefix.with_name(prefix.name + "_metrics.png"))
    fig.savefig(paths[1], dpi=120)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a float run directory or model (skips training)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--d_model", type=int, default=32)
    parser.add_argument("--d_state", type=int, default=16)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-train", type=int, default=None, help="train on the first N digits (smoke runs)")
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--chunk", type=float, default=1 / 16, help="greedy step: fraction of a layer's units")
    parser.add_argument("--bits", type=int, default=8, help="uniform width for the cost figures")
    parser.add_argument("--out-prefix", default="runs/figures/pruning", help="figure path prefix (runs/ is ignored by git)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "float"
        if args.checkpoint is None:
            flags = ["--dataset", "smnist", "--preset", "qs4d", "--quiet", "--seed", str(args.seed),
                     "--n_layers_m", str(args.n_layers), "--d_model_m", str(args.d_model), "--d_state",
                     str(args.d_state), "--epochs", str(args.epochs), "--out", str(run)]
            if args.limit_train:
                flags += ["--limit-train", str(args.limit_train)]
            if qs4d(["train", *flags]):
                raise SystemExit("training the float model failed")
        model = load_model(run)
    task = load_task("smnist")
    val = task.val.batch(np.arange(len(task.val)))
    test = task.test.batch(np.arange(min(args.test_samples, len(task.test))))
    res = study(model, val, test, args)
    res["seconds"] = time.perf_counter() - start
    paths = plot(res, Path(args.out_prefix), args.bits)
    if args.json:
        atomic_write_json(args.json, res)
    print(json.dumps({"base_accuracy": res["base_accuracy"], "magnitude": {
        g: [(round(r["sparsity"], 3), round(r["accuracy"], 4)) for r in rows] for g, rows in res["magnitude"].items()}}))
    print(f"saved {', '.join(map(str, paths))} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
