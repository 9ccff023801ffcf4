"""A sweep's table (``results.csv``, ``results.json``) and its accuracy-vs-bits figure.

One row per trial: ``trial``, the axis values, ``status``, ``method`` (``float`` /
``qat`` for ``train``, ``ptq``, ``eval``), ``test_acc``, ``val_acc``, the bits of
every quantization target (``bits_A`` ...; 32 = float), ``ace``,
``model_size_bits`` and ``adc`` (the QS4D formulas of ``qs4d metrics``),
``run_dir`` and, for a failed trial, ``error``.

The figure has one panel per quantized target (a trial counts for target X when
X is its only quantized target, for ``all`` when every target has one width):
test accuracy against bits, PTQ and QAT as two lines through the mean over
repeated points (seeds), each trial a dot, float trials as a dashed line.
"""
from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from qs4d_np.io import atomic_write_bytes, atomic_write_json, atomic_write_text

TARGETS = ("A", "C", "D", "dt", "linear", "act", "state", "coder")
FLOAT_BITS = 32
METRIC_COLUMNS = ("ace", "model_size_bits", "adc")
FIGURE = "accuracy_vs_bits.png"
PANELS_PER_ROW = 3
METHOD_STYLE = {"ptq": ("tab:orange", "s", "PTQ"), "qat": ("tab:blue", "o", "QAT"),
                "eval": ("tab:green", "^", "eval")}


def columns(axis_keys: Sequence[str]) -> list[str]:
    return (["trial", *axis_keys, "status", "method", "test_acc", "val_acc"] + [f"bits_{t}" for t in TARGETS]
            + list(METRIC_COLUMNS) + ["run_dir", "error"])


def make_row(name: str, axis_values: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """The row of one manifest entry (``status``, ``result``, ``error``) and its axis values."""
    result = entry.get("result") or {}
    bits = result.get("bits", {})
    row: dict[str, Any] = {"trial": name, **axis_values, "status": entry["status"], "method": result.get("method"),
                           "test_acc": result.get("test_acc"), "val_acc": result.get("val_acc")}
    row.update({f"bits_{t}": bits.get(t) for t in TARGETS})
    row.update({k: result.get(k) for k in METRIC_COLUMNS})
    row.update(run_dir=result.get("run_dir"), error=entry.get("error"))
    return row


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (list, dict, bool)) else value


def write_results(folder: str | Path, rows: list[dict[str, Any]], axis_keys: Sequence[str]) -> list[Path]:
    """``results.csv`` and ``results.json`` in ``folder`` (atomic); returns their paths."""
    folder = Path(folder)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(axis_keys), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    atomic_write_text(folder / "results.csv", buffer.getvalue())
    atomic_write_json(folder / "results.json", {"axes": list(axis_keys), "rows": rows})
    return [folder / "results.csv", folder / "results.json"]


def quantized_target(bits: dict[str, int]) -> tuple[str, int] | None:
    """(target, bits) a trial measures: its only quantized target, or ("all", b) when every target
    has b bits; None for a float model or a mix of widths."""
    low = {t: b for t, b in bits.items() if b is not None and b < FLOAT_BITS}
    if len(low) == 1:
        return next(iter(low.items()))
    if low and set(low) == set(bits) and len(set(low.values())) == 1:
        return "all", next(iter(low.values()))
    return None


def accuracy_figure(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Draw the per-target accuracy-vs-bits figure of ``rows`` to ``path`` (PNG, atomic);
    None when no finished trial quantizes a target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    floats = []
    for row in rows:
        if row["status"] != "done" or row["test_acc"] is None:
            continue
        bits = {t: row[f"bits_{t}"] for t in TARGETS if row.get(f"bits_{t}") is not None}
        point = quantized_target(bits)
        if point is None:
            if bits and all(b >= FLOAT_BITS for b in bits.values()):
                floats.append(row["test_acc"])
            continue
        target, b = point
        points[target][row["method"]][b].append(row["test_acc"])
    if not points:
        return None
    order = [t for t in ("all",) + TARGETS if t in points]
    cols = min(PANELS_PER_ROW, len(order))
    rows_n = -(-len(order) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.8 * rows_n), sharey=True, squeeze=False)
    for ax in axes.flat[len(order):]:
        ax.set_visible(False)
    for ax, target in zip(axes.flat, order):
        for method, by_bits in sorted(points[target].items()):
            color, marker, label = METHOD_STYLE.get(method, ("tab:gray", "x", method))
            xs = sorted(by_bits)
            ax.plot(xs, [sum(by_bits[b]) / len(by_bits[b]) for b in xs], color=color, marker=marker, label=label)
            ax.scatter([b for b in xs for _ in by_bits[b]], [a for b in xs for a in by_bits[b]],
                       color=color, alpha=0.35, s=12)
        if floats:
            ax.axhline(sum(floats) / len(floats), color="black", linestyle="--", linewidth=1, label="float")
        ax.set_xticks(sorted({b for by_bits in points[target].values() for b in by_bits}))
        ax.set_title(target)
        ax.set_xlabel("bits")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("test accuracy")
    axes.flat[len(order) - 1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
