"""Dropout: channel dropout (one mask per (batch, channel), shared over time) or elementwise."""
from __future__ import annotations

import numpy as np

from qs4d_np.core.activations import float_input, matching_grad
from qs4d_np.core.checks import check_bool, check_float
from qs4d_np.core.module import Module
from qs4d_np.kernels.elementwise import channel_mask_apply


class Dropout(Module):
    """Zero entries with probability p in training and scale the rest by 1/(1-p).

    shared_over_time=True (the default, PyTorch's Dropout1d on (B, H, L)) draws
    one keep/drop per (batch, channel) of a (batch, length, channels) input and
    applies it at every time step; False draws one per element (any shape).
    Identity (no copy) when not training or p = 0.
    """

    def __init__(self, p: float, *, shared_over_time: bool = True,
                 seed: int | np.random.Generator | None = None) -> None:
        super().__init__()
        self.p = check_float("p", p, min_value=0.0, max_value=1.0, max_inclusive=False)
        self.shared_over_time = check_bool("shared_over_time", shared_over_time)
        self.rng = np.random.default_rng(seed)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        training = check_bool("training", training)
        x = float_input("x", x)
        if self.shared_over_time and x.ndim != 3:
            raise ValueError(f"x must have shape (batch, length, channels) for shared_over_time dropout, got {x.shape}")
        if not training or self.p == 0.0:
            self._cache = (None, x.shape, x.dtype)
            return x
        keep_shape = (x.shape[0], x.shape[2]) if self.shared_over_time else x.shape
        mask = ((self.rng.random(keep_shape) >= self.p) / (1.0 - self.p)).astype(x.dtype)
        self._cache = (mask, x.shape, x.dtype)
        return self._apply(x, mask)

    def _apply(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if not self.shared_over_time:
            return x * mask
        out = np.empty_like(x)
        channel_mask_apply(x, mask, out)
        return out

    def backward(self, grad: np.ndarray) -> np.ndarray:
        mask, shape, dtype = self._saved()
        grad = matching_grad(grad, shape, dtype)
        return grad if mask is None else self._apply(grad, mask)
