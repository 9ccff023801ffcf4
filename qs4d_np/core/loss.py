"""Softmax cross-entropy with integer labels, averaged over the batch."""
from __future__ import annotations

import numpy as np

from qs4d_np.core.checks import check_array
from qs4d_np.core.module import Module


class SoftmaxCrossEntropy(Module):
    """loss = mean_b( logsumexp(logits[b]) - logits[b, labels[b]] ).

    ``forward(logits, labels)``: logits (batch, classes) finite floats, labels
    (batch,) integers in [0, classes). ``backward(grad=1.0)`` returns
    dloss/dlogits = grad * (softmax(logits) - onehot(labels)) / batch.
    The log-sum-exp subtracts each row's maximum, so large logits do not overflow.
    """

    def forward(self, logits: np.ndarray, labels: np.ndarray) -> float:  # type: ignore[override]
        logits = check_array("logits", logits, ndim=2, finite=True)
        if logits.dtype.kind != "f":
            raise TypeError(f"logits must be floating point, got dtype {logits.dtype}")
        batch, classes = logits.shape
        if batch < 1 or classes < 1:
            raise ValueError(f"logits must have batch >= 1 and classes >= 1, got shape {logits.shape}")
        labels = check_array("labels", labels, shape=(batch,))
        if labels.dtype.kind not in ("i", "u"):
            raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.min() < 0 or labels.max() >= classes:
            bad = labels[(labels < 0) | (labels >= classes)]
            raise ValueError(f"labels must be in [0, {classes}), got {bad[:5].tolist()}")
        shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        logsumexp = np.log(np.exp(shifted).sum(axis=1))
        rows = np.arange(batch)
        self._cache = (shifted, logsumexp, labels, logits.dtype)
        return float(np.mean(logsumexp - shifted[rows, labels]))

    def backward(self, grad: float = 1.0) -> np.ndarray:  # type: ignore[override]
        shifted, logsumexp, labels, dtype = self._saved()
        dlogits = np.exp(shifted - logsumexp[:, None])
        dlogits[np.arange(len(labels)), labels] -= 1.0
        return (dlogits * (grad / len(labels))).astype(dtype)
