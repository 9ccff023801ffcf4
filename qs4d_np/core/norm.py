"""Normalisation over channels: LayerNorm (per position) and BatchNorm (per channel over batch and time)."""
from __future__ import annotations

import numpy as np

from qs4d_np.core.activations import matching_grad
from qs4d_np.core.checks import check_array, check_bool, check_float, check_int
from qs4d_np.core.linear import sum_rows
from qs4d_np.core.module import Module
from qs4d_np.kernels.norm import (batchnorm_backward, column_affine, column_moments,
                                  layernorm_backward, layernorm_forward)


class _ChannelNorm(Module):
    """Shared constructor and input handling: params ``weight`` (ones) and ``bias`` (zeros), shape (d,),
    read through the ``weight`` and ``bias`` properties; ``eps`` is a plain attribute."""

    def __init__(self, d: int, *, eps: float = 1e-5, dtype: type = np.float32) -> None:
        super().__init__()
        self.d = check_int("d", d, min_value=1)
        self.eps = check_float("eps", eps, min_value=0.0, min_inclusive=False)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self._params["weight"] = np.ones(self.d, dtype=self.dtype)
        self._params["bias"] = np.zeros(self.d, dtype=self.dtype)

    @property
    def weight(self) -> np.ndarray:
        """The (d,) gain the forward multiplies by (the ``weight`` parameter, not a copy: treat it as
        read-only)."""
        return self._params["weight"]

    @property
    def bias(self) -> np.ndarray:
        """The (d,) offset the forward adds (the ``bias`` parameter, not a copy: treat it as read-only)."""
        return self._params["bias"]

    def _rows(self, x: np.ndarray) -> np.ndarray:
        x = check_array("x", x, finite=False)
        if x.ndim < 1 or x.shape[-1] != self.d:
            raise ValueError(f"x must have shape (..., {self.d}), got {x.shape}")
        return np.ascontiguousarray(x, dtype=self.dtype).reshape(-1, self.d)

    def _grad_rows(self, grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return matching_grad(grad, shape, self.dtype).reshape(-1, self.d)


class LayerNorm(_ChannelNorm):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis; x (..., d).

    mean and (biased) var are per position; training and eval behave alike. So it
    has no evaluation-mode fold into a per-channel affine map (``BatchNorm.folded``):
    its statistics come from each position's own values (which is why the integer
    golden model refuses it). ``weight``, ``bias`` and ``eps`` are readable.
    """

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        training = check_bool("training", training)
        x2 = self._rows(x)
        out = np.empty_like(x2)
        mean = np.empty(x2.shape[0])
        rstd = np.empty(x2.shape[0])
        layernorm_forward(x2, self._params["weight"], self._params["bias"], self.eps, out, mean, rstd)
        self._cache = (x2, mean, rstd, x.shape)
        return out.reshape(x.shape)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        x2, mean, rstd, shape = self._saved()
        g2 = self._grad_rows(grad, shape)
        dx = np.empty_like(x2)
        dw, db = layernorm_backward(x2, self._params["weight"], mean, rstd, g2, dx)
        self._grads["weight"] = dw.astype(self.dtype)
        self._grads["bias"] = db.astype(self.dtype)
        return dx.reshape(shape)


class BatchNorm(_ChannelNorm):
    """Per-channel normalisation over every axis but the last (batch and time for (B, L, d)).

    Training: normalise with the batch mean and biased variance, and update the
    running estimates like PyTorch: running = (1 - momentum) * running +
    momentum * batch value, using the unbiased variance for ``running_var``.
    Eval: normalise with the running estimates. ``running_mean`` (zeros) and
    ``running_var`` (ones) are buffers in ``.buffers``, not parameters. In eval the
    op is a per-channel affine map, ``folded()``.
    """

    def __init__(self, d: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 dtype: type = np.float32) -> None:
        super().__init__(d, eps=eps, dtype=dtype)
        self.momentum = check_float("momentum", momentum, min_value=0.0, max_value=1.0)
        self.buffers: dict[str, np.ndarray] = {
            "running_mean": np.zeros(self.d, dtype=self.dtype),
            "running_var": np.ones(self.d, dtype=self.dtype),
        }

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """The evaluation-mode map as per-channel (scale, shift), (d,) float64 each: y = scale*x + shift.

        From the running statistics: scale = weight / sqrt(running_var + eps) and
        shift = bias - scale * running_mean, computed in float64 from the stored values. An
        evaluation forward applies the same map in the op's dtype (equal up to rounding).
        """
        var = self.buffers["running_var"].astype(np.float64)
        scale = self.weight.astype(np.float64) / np.sqrt(var + self.eps)
        shift = self.bias.astype(np.float64) - scale * self.buffers["running_mean"].astype(np.float64)
        return scale, shift

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        training = check_bool("training", training)
        x2 = self._rows(x)
        rows = x2.shape[0]
        if training:
            if rows < 2:
                raise ValueError(f"BatchNorm in training needs more than 1 value per channel, got x of shape {x.shape}")
            mean, var = column_moments(x2)
            m = self.momentum
            self.buffers["running_mean"][...] = (1 - m) * self.buffers["running_mean"] + m * mean
            self.buffers["running_var"][...] = (1 - m) * self.buffers["running_var"] + m * var * (rows / (rows - 1))
        else:
            mean = self.buffers["running_mean"].astype(np.float64)
            var = self.buffers["running_var"].astype(np.float64)
        rstd, scale, shift = self._affine(mean, var)
        out = np.empty_like(x2)
        column_affine(x2, scale, shift, out)
        self._cache = (x2, mean, rstd, training, x.shape)
        return out.reshape(x.shape)

    def _affine(self, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rstd float64, scale, shift in ``dtype``), each (d,): the forward's y = x*scale + shift."""
        rstd = 1.0 / np.sqrt(var + self.eps)
        scale = self._params["weight"] * rstd
        return rstd, scale.astype(self.dtype), (self._params["bias"] - mean * scale).astype(self.dtype)

    def eval_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift), each (d,) in ``dtype``: evaluation maps x to x*scale + shift with exactly
        these values (from the running statistics), e.g. for a fused streaming kernel."""
        _, scale, shift = self._affine(self.buffers["running_mean"].astype(np.float64),
                                       self.buffers["running_var"].astype(np.float64))
        return scale, shift

    def backward(self, grad: np.ndarray) -> np.ndarray:
        x2, mean, rstd, training, shape = self._saved()
        g2 = self._grad_rows(grad, shape)
        weight = self._params["weight"]
        dx = np.empty_like(x2)
        if training:
            dw, db = batchnorm_backward(x2, weight, mean, rstd, g2, dx)
        else:
            # fixed statistics: a per-channel affine map
            column_affine(g2, (weight * rstd).astype(self.dtype), np.zeros(self.d, self.dtype), dx)
            dw = sum_rows(g2 * ((x2 - mean) * rstd), np.float64)
            db = sum_rows(g2, np.float64)
        self._grads["weight"] = dw.astype(self.dtype)
        self._grads["bias"] = db.astype(self.dtype)
        return dx.reshape(shape)
