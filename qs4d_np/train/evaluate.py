"""One evaluation pass of a model over a batch iterator (``evaluate_model``), and the running
sums of a pass (``Totals``) the training loop keeps too."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from qs4d_np.core.loss import SoftmaxCrossEntropy
from qs4d_np.data.loader import BatchIterator


@dataclasses.dataclass
class Totals:
    """Running sums over one pass: loss * samples, correct predictions, samples."""

    loss: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, loss: float, logits: np.ndarray, y: np.ndarray) -> None:
        self.loss += loss * len(y)
        self.correct += int(np.count_nonzero(np.argmax(logits, axis=1) == y))
        self.count += len(y)

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


def evaluate_model(model: Any, batches: BatchIterator, *, mode: str | None = None, desc: str = "eval",
                   progress: bool = False) -> dict[str, float]:
    """Mean cross-entropy ``loss``, accuracy ``acc``, ``count`` of samples and ``nonfinite`` logit count
    of ``model`` in eval mode over one pass of ``batches``.

    ``mode`` ("conv" | "recurrent") is passed to ``model.forward`` when given.
    A sample whose logits are not all finite counts as wrong; the loss then is NaN.
    """
    loss_fn, totals, nonfinite = SoftmaxCrossEntropy(), Totals(), 0
    kwargs = {} if mode is None else {"mode": mode}
    for x, y in tqdm(batches.epoch(), total=len(batches), desc=desc, disable=not progress, leave=False):
        logits = model.forward(x, training=False, **kwargs)
        finite = np.isfinite(logits).all(axis=1)
        if not finite.all():
            nonfinite += int(np.size(logits) - np.count_nonzero(np.isfinite(logits)))
            totals.loss, totals.count = math.nan, totals.count + len(y)
            totals.correct += int(np.count_nonzero((np.argmax(logits, axis=1) == y) & finite))
            continue
        totals.add(loss_fn.forward(logits, y), logits, y)
    return {"loss": totals.mean_loss, "acc": totals.accuracy, "count": totals.count, "nonfinite": nonfinite}

