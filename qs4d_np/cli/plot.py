"""``qs4d plot``: accuracy versus bit width, PTQ against QAT per target (as in the QS4D paper's figure).

Example::

    qs4d plot runs/float/ptq/ptq.json runs/qat4 runs/qat6 --out docs/figures/ptq_vs_qat.png

Inputs, any number and mix:

* a results JSON: ``{"float_accuracy": a, "ptq": [rows], "qat": [rows]}``
  (``ptq.json`` of ``qs4d ptq`` has the first two; the sMNIST example writes all
  three); rows are ``{"target", "bits", "accuracy"}``;
* a QAT run directory of ``qs4d train``: its test accuracy becomes one QAT row,
  at the target and width its quantization flags set (one target or ``all``,
  with 2**bits states).

One panel per target: PTQ and QAT accuracy over bits, the float accuracy as a
dashed line.
"""
from __future__ import annotations

import argparse
import io
import math
from pathlib import Path
from typing import Any, Iterable

from qs4d_np.cli.common import CommandError, check_out_file, command, model_path
from qs4d_np.io import atomic_write_bytes, json_get, load_json

TARGET_ORDER = ("all", "A", "B", "C", "D", "dt", "linear", "act", "state", "coder")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plot", help="accuracy-vs-bits figure (PTQ vs QAT per target)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="results JSON files and/or QAT run directories")
    parser.add_argument("--out", required=True, metavar="FIG.png")
    parser.add_argument("--title", default=None)
    parser.set_defaults(func=run)


def bits_of(levels: int, where: str) -> int:
    bits = int(round(math.log2(levels))) if levels >= 2 else -1
    if bits < 1 or 2 ** bits != levels:
        raise CommandError(f"{where}: {levels} quantization states is not a power of two; cannot place it on a bits axis")
    return bits


def qat_row(run_dir: Path) -> dict[str, Any]:
    """The QAT point of a ``qs4d train`` run directory: target, bits, levels, test accuracy."""
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise CommandError(f"{run_dir} has no results.json: not a finished qs4d train run")
    model_json = model_path(run_dir).with_suffix(".json")
    quant = json_get(load_json(model_json), ("config",), model_json, dict).get("quant")
    if not quant:
        raise CommandError(f"{run_dir} is a float run (no quantization): give it as the float accuracy through a "
                           "results JSON instead")
    json_get(quant, ("all",), model_json, (int, type(None)))
    set_levels = {t: v for t, v in json_get(quant, ("levels",), model_json, dict).items() if v is not None}
    if quant["all"] is not None and not set_levels:
        target, levels = "all", quant["all"]
    elif quant["all"] is None and len(set_levels) == 1:
        (target, levels), = set_levels.items()
    else:
        raise CommandError(f"{run_dir} quantizes several targets at their own widths (all={quant['all']}, "
                           f"{set_levels}): only single-target or all-target runs are plotted")
    if not isinstance(levels, int):
        raise CommandError(f"{run_dir}: per-layer widths {levels!r} are not plotted")
    return {"target": target, "bits": bits_of(levels, str(run_dir)), "levels": levels,
            "accuracy": json_get(load_json(results_path), ("test_acc",), results_path, float), "source": str(run_dir)}


def collect(inputs: Iterable[str | Path]) -> dict[str, Any]:
    """Merge inputs into ``{"float_accuracy", "ptq": rows, "qat": rows}`` (first float accuracy found wins)."""
    merged: dict[str, Any] = {"float_accuracy": None, "ptq": [], "qat": []}
    for item in map(Path, inputs):
        if item.is_dir():
            merged["qat"].append(qat_row(item))
            continue
        if not item.is_file():
            raise FileNotFoundError(f"no such input: {item}")
        data = load_json(item)
        if not isinstance(data, dict) or not ({"ptq", "qat", "float_accuracy"} & set(data)):
            raise CommandError(f"{item} is not a results JSON (no 'ptq', 'qat' or 'float_accuracy' key)")
        if merged["float_accuracy"] is None and "float_accuracy" in data:
            merged["float_accuracy"] = json_get(data, ("float_accuracy",), item, (float, type(None)))
        for kind in ("ptq", "qat"):
            for i, row in enumerate(json_get(data, (kind,), item, list) if kind in data else []):
                for key, kinds in (("target", str), ("bits", int), ("accuracy", float)):
                    json_get(row, (key,), f"{item}: {kind}[{i}]", kinds)
                merged[kind].append(row)
    if not merged["ptq"] and not merged["qat"]:
        raise CommandError("nothing to plot: the inputs hold no PTQ or QAT rows")
    return merged


def plot_accuracy_vs_bits(results: dict[str, Any], out: str | Path, title: str | None = None) -> Path:
    """Draw ``results`` (see :func:`collect`) to ``out`` (PNG); returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [t for t in TARGET_ORDER if any(r["target"] == t for r in results["ptq"] + results["qat"])]
    cols = min(len(targets), 3)
    rows = -(-len(targets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False, sharey=True)
    for ax, target in zip(axes.flat, targets):
        for kind, style in (("ptq", dict(marker="o", color="tab:red")), ("qat", dict(marker="s", color="tab:blue"))):
            points = sorted((r["bits"], 100 * r["accuracy"]) for r in results[kind] if r["target"] == target)
            if points:
                ax.plot(*zip(*points), label=kind.upper(), **style)
        if results["float_accuracy"] is not None:
            ax.axhline(100 * results["float_accuracy"], color="k", linestyle="--", linewidth=1, label="float")
        ax.set_title(f"{target} quantized")
        ax.set_xlabel("bits (2**bits quantization states)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)")
    for ax in list(axes.flat)[len(targets):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return save_png(fig, out)


def save_png(fig: Any, out: str | Path) -> Path:
    """Lay out a matplotlib figure, write it to ``out`` as PNG (atomically), close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(out, buffer.getvalue())
    return Path(out)


@command("plot")
def run(args: argparse.Namespace) -> int:
    check_out_file(args.out)
    out = plot_accuracy_vs_bits(collect(args.inputs), args.out, args.title)
    print(f"wrote {out}")
    return 0
