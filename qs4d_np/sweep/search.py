"""Greedy bit allocation under a hardware budget (the QS4D reference's procedure).

Start with every target at ``start`` bits. While the cost is above the budget,
try lowering each target by ``step`` bits (not below ``minimum``; moves that save
no cost, such as ``D``, which no formula counts, are left out), evaluate all of
these candidates (in parallel: one trial each) and keep the move with the best
accuracy change per cost saved, ``(acc_new - acc) / (cost - cost_new)`` (ties:
the larger saving, then the target order). Accuracy is the validation accuracy
(the test set only reports), cost one of the QS4D formulas (ACE, model size, ADC).

The search itself knows nothing of trials: ``cost(widths)`` and
``evaluate([widths, ...]) -> [result, ...]`` come from the caller.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

from qs4d_np.sweep.errors import SweepError

# --budget metric -> cost_report field
BUDGET_METRICS = {"ace": "ace", "size": "model_size_bits", "adc": "adc"}
Widths = dict[str, int]


@dataclasses.dataclass(frozen=True)
class Budget:
    """``metric`` (ace | size | adc) at most ``value``; with ``reduction``, ``value`` is a factor
    below the float32 model's cost (``ace=8x``)."""

    metric: str
    value: float
    reduction: bool = False

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """``METRIC=NUMBER`` (absolute) or ``METRIC=FACTORx`` (reduction vs float32)."""
        metric, sep, number = text.partition("=")
        if not sep or metric not in BUDGET_METRICS:
            raise SweepError(f"--budget must be METRIC=VALUE with METRIC one of {', '.join(BUDGET_METRICS)}, "
                             f"got {text!r}")
        reduction = number.endswith("x")
        try:
            value = float(number[:-1] if reduction else number)
        except ValueError:
            raise SweepError(f"--budget {text!r}: {number!r} is not a number (or a factor like 8x)") from None
        if not math.isfinite(value) or value <= 0 or (reduction and value < 1):
            raise SweepError(f"--budget {text!r}: expected a positive number (a factor >= 1 with x), got {number}")
        return cls(metric, value, reduction)

    def limit(self, float_cost: float) -> float:
        """The largest allowed cost (``float_cost``: the float32 model's)."""
        return float_cost / self.value if self.reduction else self.value

    def __str__(self) -> str:
        return f"{self.metric}={self.value:g}{'x' if self.reduction else ''}"


@dataclasses.dataclass
class Step:
    """One point of the search path: its widths, cost, result and the move that led to it."""

    widths: Widths
    cost: float
    result: dict[str, Any]
    move: dict[str, Any] | None = None
    candidates: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return float(self.result["val_acc"])

    def to_dict(self) -> dict[str, Any]:
        return {"widths": self.widths, "cost": self.cost, "val_acc": self.result.get("val_acc"),
                "test_acc": self.result.get("test_acc"), "run_dir": self.result.get("run_dir"),
                "move": self.move, "candidates": self.candidates}


def lowered(widths: Widths, target: str, step: int) -> Widths:
    return {**widths, target: widths[target] - step}


def check_reachable(targets: Sequence[str], cost: Callable[[Widths], float], limit: float, *,
                    start: int, minimum: int, step: int) -> None:
    """Refuse a search that cannot end: no targets, bad widths, or a budget below the cost of
    every target at its lowest reachable width."""
    if not targets:
        raise SweepError("the search needs at least one target")
    if not (1 <= minimum <= start) or step < 1:
        raise SweepError(f"need 1 <= minimum bits <= start bits and step >= 1, got minimum {minimum}, "
                         f"start {start}, step {step}")
    lowest = {t: start - ((start - minimum) // step) * step for t in targets}
    if cost(lowest) > limit:
        raise SweepError(f"the budget {limit:,.0f} cannot be met: every target at its lowest width "
                         f"({min(lowest.values())} bits) still costs {cost(lowest):,.0f}; "
                         "lower --min-bits, add --targets or raise the budget")


def greedy_search(targets: Sequence[str], cost: Callable[[Widths], float],
                  evaluate: Callable[[list[Widths]], list[dict[str, Any]]], limit: float, *,
                  start: int = 8, minimum: int = 2, step: int = 1,
                  log: Callable[[str], None] = print) -> list[Step]:
    """The path from ``start`` bits everywhere to the first widths with ``cost <= limit``."""
    check_reachable(targets, cost, limit, start=start, minimum=minimum, step=step)
    current = {t: start for t in targets}
    path = [Step(current, cost(current), evaluate([current])[0])]
    log(f"start: {start} bits everywhere, cost {path[0].cost:,.0f}, val acc {path[0].accuracy:.4f}")
    while path[-1].cost > limit:
        here = path[-1]
        moves = [(t, lowered(here.widths, t, step)) for t in targets if here.widths[t] - step >= minimum]
        moves = [(t, w) for t, w in moves if cost(w) < here.cost]
        results = evaluate([w for _, w in moves])
        candidates = []
        for (target, widths), result in zip(moves, results):
            saved = here.cost - cost(widths)
            candidates.append({"target": target, "bits": widths[target], "cost": cost(widths),
                               "val_acc": result["val_acc"], "test_acc": result.get("test_acc"),
                               "score": (result["val_acc"] - here.accuracy) / saved, "saved": saved})
        order = {t: i for i, t in enumerate(targets)}
        best = max(range(len(candidates)), key=lambda i: (candidates[i]["score"], candidates[i]["saved"],
                                                          -order[candidates[i]["target"]]))
        target, widths = moves[best]
        move = {"target": target, "from": here.widths[target], "to": widths[target]}
        path.append(Step(widths, cost(widths), results[best], move, candidates))
        log(f"round {len(path) - 1}: {target} {move['from']} -> {move['to']} bits "
            f"({len(candidates)} candidates): cost {here.cost:,.0f} -> {path[-1].cost:,.0f}, "
            f"val acc {here.accuracy:.4f} -> {path[-1].accuracy:.4f}")
    return path


def path_figure(path: list[Step], path_png: Any, metric: str, limit: float, float_cost: float,
                title: str = "") -> Any:
    """Accuracy (validation and test) along the search path against the cost reduction vs float32
    (``float_cost / cost``), each point labelled with its move, the budget as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qs4d_np.sweep.results import save_figure

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    reduction = [float_cost / s.cost for s in path]
    ax.plot(reduction, [s.result["val_acc"] for s in path], marker="o", label="validation")
    if all(s.result.get("test_acc") is not None for s in path):
        ax.plot(reduction, [s.result["test_acc"] for s in path], marker="s", label="test")
    for i, (x, s) in enumerate(zip(reduction, path)):
        label = "start" if s.move is None else f"{s.move['target']} {s.move['to']}b"
        # above and below in turn: consecutive small moves sit close together
        ax.annotate(label, (x, s.result["val_acc"]), fontsize=7, textcoords="offset points",
                    xytext=(3, 5 if i % 2 else -11))
    ax.axvline(float_cost / limit, color="black", linestyle="--", linewidth=1, label="budget")
    ax.set_xlabel(f"{metric} reduction vs float32 (x)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path_png)
