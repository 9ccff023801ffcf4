"""Pointwise activations: GELU (exact erf), ReLU, GLU (split the last axis in half).

Like every inner op, these check types and shapes but not finiteness (a full
extra pass over the activations); the model checks its input once at entry.
"""
from __future__ import annotations

import numpy as np

from qs4d_np.core.checks import check_array, check_bool
from qs4d_np.core.module import Module
from qs4d_np.kernels.elementwise import gelu_backward, gelu_forward, glu_backward, glu_forward


def float_input(name: str, x: object) -> np.ndarray:
    """``x`` as a C-contiguous float array (float64 unless it already is float32/64)."""
    x = check_array(name, x, finite=False)
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    return np.ascontiguousarray(x, dtype=dtype)


def matching_grad(grad: object, out_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Check an upstream gradient against the forward output's shape; C-contiguous in ``dtype``."""
    grad = check_array("grad", grad, shape=out_shape, finite=False)
    return np.ascontiguousarray(grad, dtype=dtype)


class GELU(Module):
    """y = x * Phi(x) with the exact normal CDF Phi (erf form). Any shape."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        training = check_bool("training", training)
        x = float_input("x", x)
        out = np.empty_like(x)
        cdf = np.empty_like(x)
        gelu_forward(x.reshape(-1), out.reshape(-1), cdf.reshape(-1))
        self._cache = (x, cdf)
        return out

    def backward(self, grad: np.ndarray) -> np.ndarray:
        x, cdf = self._saved()
        grad = matching_grad(grad, x.shape, x.dtype)
        dx = np.empty_like(x)
        gelu_backward(x.reshape(-1), cdf.reshape(-1), grad.reshape(-1), dx.reshape(-1))
        return dx


class ReLU(Module):
    """y = max(x, 0); the gradient at 0 is taken as 0. Any shape."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        training = check_bool("training", training)
        x = float_input("x", x)
        self._cache = x
        return np.maximum(x, 0)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        x = self._saved()
        grad = matching_grad(grad, x.shape, x.dtype)
        return np.where(x > 0, grad, x.dtype.type(0))


class GLU(Module):
    """GLU over the last axis: x (..., 2C) -> a * sigmoid(b) (..., C) with a, b = the two halves."""

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        training = check_bool("training", training)
        x = float_input("x", x)
        if x.ndim < 1 or x.shape[-1] % 2 or x.shape[-1] == 0:
            raise ValueError(f"x must have an even, non-zero last axis (..., 2C), got shape {x.shape}")
        c2 = x.shape[-1]
        z = x.reshape(-1, c2)
        out = np.empty((z.shape[0], c2 // 2), dtype=x.dtype)
        gate = np.empty_like(out)
        zero_bias = np.zeros(c2, dtype=x.dtype)
        glu_forward(z, zero_bias, out, gate)
        self._cache = (z, zero_bias, gate, x.shape)
        return out.reshape(*x.shape[:-1], c2 // 2)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        z, zero_bias, gate, shape = self._saved()
        grad = matching_grad(grad, (*shape[:-1], shape[-1] // 2), z.dtype)
        dz = np.empty_like(z)
        glu_backward(z, zero_bias, gate, grad.reshape(z.shape[0], -1), dz)
        return dz.reshape(shape)
