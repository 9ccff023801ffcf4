"""Pooling over time: (batch, length, channels) -> (batch, channels)."""
from __future__ import annotations

import numpy as np

from qs4d_np.core.activations import float_input, matching_grad
from qs4d_np.core.checks import check_bool
from qs4d_np.core.module import Module


def _sequence(x: object) -> np.ndarray:
    x = float_input("x", x)
    if x.ndim != 3 or x.shape[1] < 1:
        raise ValueError(f"x must have shape (batch, length >= 1, channels), got {x.shape}")
    return x


class MeanPool(Module):
    """y[b, h] = mean over t of x[b, t, h] (accumulated in float64)."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        training = check_bool("training", training)
        x = _sequence(x)
        self._cache = (x.shape, x.dtype)
        return x.mean(axis=1, dtype=np.float64).astype(x.dtype)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        shape, dtype = self._saved()
        grad = matching_grad(grad, (shape[0], shape[2]), dtype)
        dx = np.empty(shape, dtype=dtype)
        dx[...] = (grad / dtype.type(shape[1]))[:, None, :]
        return dx


class LastPool(Module):
    """y[b, h] = x[b, L-1, h]: the last time step."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        training = check_bool("training", training)
        x = _sequence(x)
        self._cache = (x.shape, x.dtype)
        return x[:, -1, :].copy()

    def backward(self, grad: np.ndarray) -> np.ndarray:
        shape, dtype = self._saved()
        grad = matching_grad(grad, (shape[0], shape[2]), dtype)
        dx = np.zeros(shape, dtype=dtype)
        dx[:, -1, :] = grad
        return dx
