"""Learning-rate schedule stepped once per epoch: optional linear warmup, then cosine.

Without warmup the factor at epoch e (0-based) is torch's CosineAnnealingLR
with T_max = epochs and eta_min = 0:

    factor(e) = (1 + cos(pi * e / epochs)) / 2

With ``warmup_epochs = w > 0`` (ours): factor(e) = (e + 1) / (w + 1) for
e < w, then the cosine above over the remaining epochs - w epochs, starting
at 1 at epoch w. The optimizer multiplies each group's base lr by the factor.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from qs4d_np.core.checks import check_int


class CosineSchedule:
    """Per-epoch lr factor; a pure function of the epoch, so its state is its settings."""

    def __init__(self, epochs: int, warmup_epochs: int = 0) -> None:
        self.epochs = check_int("epochs", epochs, min_value=1)
        self.warmup_epochs = check_int("warmup_epochs", warmup_epochs, min_value=0, max_value=self.epochs - 1)

    def factor(self, epoch: int) -> float:
        """The lr factor for 0-based ``epoch`` (0 <= epoch < epochs)."""
        epoch = check_int("epoch", epoch, min_value=0, max_value=self.epochs - 1)
        w = self.warmup_epochs
        if epoch < w:
            return (epoch + 1) / (w + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - w) / (self.epochs - w)))

    def state(self) -> dict[str, Any]:
        return {"kind": "cosine", "epochs": self.epochs, "warmup_epochs": self.warmup_epochs}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "CosineSchedule":
        if state.get("kind") != "cosine":
            raise ValueError(f"schedule state must have kind 'cosine', got {state.get('kind')!r}")
        return cls(state["epochs"], state["warmup_epochs"])
