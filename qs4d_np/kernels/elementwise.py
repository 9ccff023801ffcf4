"""Fused elementwise Numba kernels: GELU, bias + GLU, channel-mask apply.

Each kernel makes one parallel pass over its data and writes into a
caller-provided ``out`` array, so an op costs one read and one write of its
activations instead of a chain of NumPy temporaries. Arrays must be
C-contiguous; the ops in ``qs4d_np.core`` reshape (B, L, C) activations into
2-D (rows, C) views before calling. Column sums (bias gradients) are
accumulated in float64 per fixed block of ``ROW_BLOCK`` rows and the blocks
are then added, so the result does not depend on the number of threads.

float64 twins of every kernel live in ``reference/ops.py``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# Rows per partial-sum block in column reductions (fixed for determinism).
ROW_BLOCK = 1024

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def n_row_blocks(rows: int) -> int:
    """Number of ``ROW_BLOCK``-row blocks covering ``rows`` rows."""
    return max(1, -(-rows // ROW_BLOCK))


@njit(cache=True, parallel=True)
def gelu_forward(x, out):
    """out = x * Phi(x) (exact erf GELU) for flat 1-D ``x`` and ``out``."""
    for i in prange(x.size):
        v = x[i]
        out[i] = 0.5 * v * (1.0 + math.erf(v * _INV_SQRT2))


@njit(cache=True, parallel=True)
def gelu_backward(x, grad, out):
    """out = grad * (Phi(x) + x * phi(x)), the exact GELU derivative (flat 1-D)."""
    for i in prange(x.size):
        v = x[i]
        cdf = 0.5 * (1.0 + math.erf(v * _INV_SQRT2))
        pdf = _INV_SQRT_2PI * math.exp(-0.5 * v * v)
        out[i] = grad[i] * (cdf + v * pdf)


@njit(cache=True, parallel=True)
def glu_forward(z, bias, out):
    """GLU of ``z + bias`` along the last axis.

    z (rows, 2C), bias (2C,), out (rows, C):
    out = (z[:, :C] + bias[:C]) * sigmoid(z[:, C:] + bias[C:]).
    """
    rows, c2 = z.shape
    c = c2 // 2
    for r in prange(rows):
        for j in range(c):
            a = z[r, j] + bias[j]
            g = z[r, c + j] + bias[c + j]
            out[r, j] = a / (1.0 + math.exp(-g))


@njit(cache=True, parallel=True)
def glu_backward(z, bias, grad, dz):
    """Backward of ``glu_forward``: fills dz (rows, 2C), returns dbias (2C,) float64.

    With a = z_a + bias_a, g = z_g + bias_g, s = sigmoid(g):
    dz_a = grad * s, dz_g = grad * a * s * (1 - s); dbias = column sums of dz.
    """
    rows, c2 = z.shape
    c = c2 // 2
    nblocks = max(1, (rows + ROW_BLOCK - 1) // ROW_BLOCK)
    partial = np.zeros((nblocks, c2))
    for blk in prange(nblocks):
        stop = min(rows, (blk + 1) * ROW_BLOCK)
        for r in range(blk * ROW_BLOCK, stop):
            for j in range(c):
                a = z[r, j] + bias[j]
                s = 1.0 / (1.0 + math.exp(-(z[r, c + j] + bias[c + j])))
                da = grad[r, j] * s
                dg = grad[r, j] * a * s * (1.0 - s)
                dz[r, j] = da
                dz[r, c + j] = dg
                partial[blk, j] += da
                partial[blk, c + j] += dg
    return partial.sum(axis=0)


@njit(cache=True, parallel=True)
def channel_mask_apply(x, mask, out):
    """out[b, l, h] = x[b, l, h] * mask[b, h]: a (batch, channel) mask shared over time."""
    batch, length, channels = x.shape
    for b in prange(batch):
        for t in range(length):
            for h in range(channels):
                out[b, t, h] = x[b, t, h] * mask[b, h]
