"""``qs4d prune``: prune a trained model on the validation split (the QS4D protocol and others).

Examples::

    qs4d prune --checkpoint runs/float --method qs4d --tolerance 1.0 --limit-val 400 --out runs/float/prune
    qs4d prune --checkpoint runs/qat7 --method channels --tolerance 1.0 --finetune-epochs 1 --out runs/qat7/prune
    qs4d prune --checkpoint runs/float --method magnitude --sparsity 0.5 --out runs/float/prune-mag

Methods (``qs4d_np.hardware.pruning``): ``qs4d``, the reference's greedy one-pass protocol
(each unit in a fixed order is zeroed and kept zero iff the validation accuracy stays >=
baseline - tolerance; the unit is a channel row of the ``--tensors``, by default C[h, :],
i.e. kernel h; ``--unit element`` tries single entries as the reference does);
``modes`` / ``channels``, structured greedy by chunks of the lowest-scoring units under the
same rule; ``magnitude``, the lowest-scoring ``--sparsity`` of the modes (``--granularity``)
of every layer. ``--tolerance`` is in accuracy points (1.0 = 1 point).

Writes ``DIR/prune.json`` (method, settings, validation accuracy before / after, test
accuracy before / after (and after fine-tuning), per layer the kernels pruned as a fraction
of H and every pruned tensor's element and row fractions, evaluations, seconds),
``DIR/pruned_model.json|.npz`` (``S4DModel.save``; ``qs4d eval --checkpoint
DIR/pruned_model``), ``DIR/prune.png`` (pruned fraction per layer, bars) and, with
``--finetune-epochs E`` > 0, the fine-tuning run in ``DIR/finetune`` (pruned entries stay
exact zeros through it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from qs4d_np.cli.common import (CommandError, add_data_flags, check_model_fits, check_out_dir, command,
                                data_settings, load_data, load_model, non_negative_float, non_negative_int,
                                positive_float, positive_int, run_info)
from qs4d_np.cli.plot import save_png
from qs4d_np.data.loader import BatchIterator
from qs4d_np.hardware.pruning import METHODS, PruneResult, prune
from qs4d_np.hardware.pruning_masks import GRANULARITIES, MaskedModel, PruneMasks
from qs4d_np.hardware.pruning_search import QS4D_TENSORS, UNITS
from qs4d_np.io import atomic_write_json
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.ssm.s4d import MODES
from qs4d_np.train.config import TrainConfig
from qs4d_np.train.evaluate import evaluate_model
from qs4d_np.train.trainer import Trainer

MODEL_NAME = "pruned_model"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prune", help="prune a trained model (JSON, pruned model, figure)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="run directory or saved model")
    # checked in run(), so that a bad value is one line like every other error of the command
    parser.add_argument("--method", default="qs4d", metavar="METHOD", help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--tolerance", type=float, default=1.0, metavar="POINTS",
                        help="accuracy drop allowed, in points (1.0 = 1 percentage point; not for magnitude)")
    parser.add_argument("--sparsity", type=float, default=None, metavar="S",
                        help="with --method magnitude: fraction of units pruned in every layer, in [0, 1]")
    parser.add_argument("--granularity", choices=GRANULARITIES, default=None,
                        help="with --method magnitude: the unit (default mode)")
    parser.add_argument("--tensors", nargs="+", default=None, metavar="T",
                        help=f"with --method qs4d: S4D-layer tensors tried, some of {', '.join(QS4D_TENSORS)} "
                             "(default C: the kernels)")
    parser.add_argument("--unit", choices=UNITS, default=None,
                        help="with --method qs4d: a channel's row (default) or single elements (the reference; slow)")
    parser.add_argument("--chunk", type=positive_float, default=None,
                        help="with --method modes/channels: greedy step, a fraction of a layer's units (default 1/16)")
    parser.add_argument("--limit-val", type=positive_int, default=None, metavar="N",
                        help="decide on the first N validation samples (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=100, metavar="B",
                        help="evaluation batch (quantized activations take their ranges per batch)")
    parser.add_argument("--mode", choices=MODES, default=None, help="S4D evaluation path (default: the model's)")
    parser.add_argument("--finetune-epochs", type=non_negative_int, default=0, metavar="E",
                        help="fine-tune the pruned model for E epochs (pruned entries stay zero)")
    parser.add_argument("--lr", type=positive_float, default=0.001, help="fine-tuning learning rate")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.01, help="fine-tuning weight decay")
    parser.add_argument("--clip", type=positive_float, default=1.0, help="fine-tuning gradient-norm clip")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="fine-tuning shuffle seed")
    add_data_flags(parser, train=False)
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.set_defaults(func=run)


def finetune(model: S4DModel, masks: PruneMasks, train: Any, val: Any, out_dir: str | Path, *, epochs: int,
             lr: float = 0.001, weight_decay: float = 0.01, clip: float | None = 1.0, batch_size: int = 50,
             eval_batch_size: int = 100, seed: int = 0) -> dict[str, Any]:
    """Fine-tune ``model`` pruned by ``masks`` (``MaskedModel``: pruned entries stay exact zeros) with the
    project's trainer in ``out_dir``; the model ends with the best validation epoch's weights. Returns
    the trainer's results."""
    config = TrainConfig(epochs=epochs, batch_size=batch_size, eval_batch_size=eval_batch_size, lr=lr,
                         weight_decay=weight_decay, clip_norm=clip, seed=seed)
    results = Trainer(MaskedModel(model, masks), train, val, config, out_dir, progress=False).fit()
    masks.apply(model)  # a no-op by construction; kept so a saved model is pruned whatever happened
    return results


def _accuracy(model: S4DModel, dataset: Any, batch_size: int, mode: str | None) -> float:
    return float(evaluate_model(model, BatchIterator(dataset, batch_size), mode=mode)["acc"])


def plot_prune(result: PruneResult, title: str) -> Any:
    """Bars: per layer, the fraction of its H kernels pruned and, per tried tensor, of its rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result.layers
    series = {"kernels (C rows)": [entry["kernel_fraction"] for entry in layers]}
    for tensor in layers[0]["tensors"]:
        if tensor != "ssm.C" and all("row_fraction" in entry["tensors"].get(tensor, {}) for entry in layers):
            series[f"{tensor.removeprefix('ssm.')} rows"] = [entry["tensors"][tensor]["row_fraction"]
                                                            for entry in layers]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(layers) * max(1, len(series)) ** 0.5, 3.6))
    width = 0.8 / len(series)
    positions = np.arange(len(layers))
    for k, (label, values) in enumerate(series.items()):
        bars = ax.bar(positions + (k - (len(series) - 1) / 2) * width, [100 * v for v in values], width,
                      label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(positions, [f"layer {i + 1}" for i in range(len(layers))])
    ax.set_ylabel("pruned [% of the layer's H]")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return fig


# the method-specific flags and the methods they apply to (given with another method: an error)
METHOD_FLAGS = {"sparsity": ("magnitude",), "granularity": ("magnitude",), "tensors": ("qs4d",),
                "unit": ("qs4d",), "chunk": ("modes", "channels")}


def _check_flags(args: argparse.Namespace) -> None:
    if args.method not in METHODS:
        raise CommandError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    if not np.isfinite(args.tolerance) or args.tolerance < 0 or args.tolerance > 100:
        raise CommandError(f"--tolerance must be a number of accuracy points in [0, 100], got {args.tolerance}")
    if args.method == "magnitude":
        if args.sparsity is None:
            raise CommandError("--method magnitude needs --sparsity S (a fraction in [0, 1])")
        if not 0.0 <= args.sparsity <= 1.0:
            raise CommandError(f"--sparsity must be a fraction in [0, 1], got {args.sparsity}")
    for flag, methods in METHOD_FLAGS.items():
        if getattr(args, flag) is not None and args.method not in methods:
            raise CommandError(f"--{flag} only applies to --method {' / '.join(methods)}, not {args.method}")


@command("prune")
def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    out = check_out_dir(args.out)
    if args.finetune_epochs and (out / "finetune").exists():
        raise CommandError(f"--out {out}: {out / 'finetune'} already exists (a fine-tuning run is never "
                           "overwritten); choose another folder")
    model = load_model(args.checkpoint)
    settings = data_settings(args, run_info(args.checkpoint).get("data"))
    task = load_data(settings)
    check_model_fits(model, task, f"--checkpoint {args.checkpoint}")
    val = task.val
    if args.limit_val is not None:
        val = val.subset(np.arange(min(args.limit_val, len(val))), f" [first {args.limit_val}]")
    x_val, y_val = val.batch(np.arange(len(val)))

    options = {flag: getattr(args, flag) for flag in METHOD_FLAGS if getattr(args, flag) is not None}
    result = prune(model, x_val, y_val, args.method, tolerance=args.tolerance / 100, **options,
                   batch_size=args.batch_size, mode=args.mode, progress=True)
    report: dict[str, Any] = {"checkpoint": str(args.checkpoint), "task": settings["task"],
                              "tolerance_points": None if result.tolerance is None else args.tolerance,
                              "base_test_accuracy": _accuracy(model, task.test, args.batch_size, args.mode)}
    result.apply(model)
    report["test_accuracy"] = _accuracy(model, task.test, args.batch_size, args.mode)
    report["test_samples"] = len(task.test)
    if args.finetune_epochs:
        fit = finetune(model, result.masks, task.train, val, out / "finetune", epochs=args.finetune_epochs,
                       lr=args.lr, weight_decay=args.weight_decay, clip=args.clip, eval_batch_size=args.batch_size,
                       seed=args.seed)
        report["finetune"] = {"epochs": args.finetune_epochs, "lr": args.lr, "weight_decay": args.weight_decay,
                              "clip": args.clip, "seed": args.seed, "best_epoch": fit["best_epoch"],
                              "val_accuracy": _accuracy(model, val, args.batch_size, args.mode),
                              "test_accuracy": _accuracy(model, task.test, args.batch_size, args.mode),
                              "zeros_kept": all(bool(np.all(model.params[n][~keep] == 0))
                                                for n, keep in result.masks.masks.items())}
    report.update(result.to_dict())
    model.save(out / MODEL_NAME)
    final_test = report["finetune"]["test_accuracy"] if args.finetune_epochs else report["test_accuracy"]
    title = (f"{args.method}" + (f", tolerance {args.tolerance:g} pt" if result.tolerance is not None else "")
             + f": val {100 * result.base_accuracy:.1f}% -> {100 * result.accuracy:.1f}%, test "
             f"{100 * report['base_test_accuracy']:.1f}% -> {100 * final_test:.1f}%"
             + (f" (fine-tuned {args.finetune_epochs} ep.)" if args.finetune_epochs else ""))
    save_png(plot_prune(result, title), out / "prune.png")
    atomic_write_json(out / "prune.json", report)
    print(json.dumps({"base_val_accuracy": result.base_accuracy, "val_accuracy": result.accuracy,
                      "test_accuracy": report["test_accuracy"],
                      "kernel_fractions": [entry["kernel_fraction"] for entry in result.layers],
                      "evaluations": result.evaluations, "seconds": round(result.seconds, 1),
                      "wrote": [str(out / n) for n in ("prune.json", f"{MODEL_NAME}.json", "prune.png")]}))
    return 0
