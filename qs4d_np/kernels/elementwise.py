"""Fused elementwise Numba kernels: GELU, bias + GLU, channel-mask apply.

Each kernel makes one pass over its data and writes into a
caller-provided ``out`` array, so an op costs one read and one write of its
activations instead of a chain of NumPy temporaries. Arrays must be
C-contiguous; the ops in ``qs4d_np.core`` reshape (B, L, C) activations into
2-D (rows, C) views before calling. Column sums (bias gradients) are
accumulated in float64 per fixed block of ``ROW_BLOCK`` rows and the blocks
are then added, so the result does not depend on the number of threads.

float64 twins of every kernel live in ``reference/ops.py``.
"""
from __future__ import annotations

import functools
import math
import types
from typing import Callable

import numpy as np
from numba import njit, prange

# Rows per partial-sum block in column reductions (fixed for determinism).
ROW_BLOCK = 1024
# Below this many entries a kernel runs on one thread: waking the thread pool
# costs more than the work, and on a shared machine a descheduled worker stalls
# the whole parallel region.
PARALLEL_MIN_SIZE = 1 << 16


def row_kernel(fn: Callable) -> Callable:
    """Compile ``fn`` twice, with ``parallel=True`` and serially (``prange`` then acts
    as ``range``), and call the parallel one when the first argument has at least
    ``PARALLEL_MIN_SIZE`` entries. Both stay reachable as ``.parallel`` / ``.serial``
    (the tests check each). The serial copy gets its own name so that Numba's
    on-disk cache keeps the two compilations apart.
    """
    serial_fn = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                   fn.__defaults__, fn.__closure__)
    serial_fn.__qualname__ = fn.__qualname__ + "_serial"
    parallel = njit(cache=True, parallel=True)(fn)
    serial = njit(cache=True)(serial_fn)

    @functools.wraps(fn)
    def dispatch(*args):
        return (parallel if args[0].size >= PARALLEL_MIN_SIZE else serial)(*args)

    dispatch.parallel = parallel
    dispatch.serial = serial
    return dispatch


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@row_kernel
def gelu_forward(x, out, cdf):
    """out = x * Phi(x) (exact erf GELU); also stores Phi(x) in ``cdf``. Flat 1-D arrays.

    Keeping Phi spares the backward pass a second erf, the costliest part of GELU.
    """
    for i in prange(x.size):
        v = x[i]
        phi = 0.5 * (1.0 + math.erf(v * _INV_SQRT2))
        cdf[i] = phi
        out[i] = v * phi


@row_kernel
def gelu_backward(x, cdf, grad, out):
    """out = grad * (Phi(x) + x * phi(x)), the exact GELU derivative, with Phi from the forward."""
    for i in prange(x.size):
        v = x[i]
        pdf = _INV_SQRT_2PI * math.exp(-0.5 * v * v)
        out[i] = grad[i] * (cdf[i] + v * pdf)


@row_kernel
def glu_forward(z, bias, out, gate):
    """GLU of ``z + bias`` along the last axis.

    z (rows, 2C), bias (2C,), out and gate (rows, C):
    gate = sigmoid(z[:, C:] + bias[C:]), out = (z[:, :C] + bias[:C]) * gate.
    The gate is kept for the backward pass (it saves an exp per entry there).
    """
    rows, c2 = z.shape
    c = c2 // 2
    for r in prange(rows):
        for j in range(c):
            s = 1.0 / (1.0 + math.exp(-(z[r, c + j] + bias[c + j])))
            gate[r, j] = s
            out[r, j] = (z[r, j] + bias[j]) * s


@row_kernel
def glu_backward(z, bias, gate, grad, dz):
    """Backward of ``glu_forward``: fills dz (rows, 2C), returns dbias (2C,) float64.

    With a = z_a + bias_a and s = gate: dz_a = grad * s,
    dz_g = grad * a * s * (1 - s); dbias = column sums of dz.
    """
    rows, c2 = z.shape
    c = c2 // 2
    nblocks = max(1, (rows + ROW_BLOCK - 1) // ROW_BLOCK)
    partial = np.zeros((nblocks, c2))
    for blk in prange(nblocks):
        stop = min(rows, (blk + 1) * ROW_BLOCK)
        for r in range(blk * ROW_BLOCK, stop):
            for j in range(c):
                s = gate[r, j]
                da = grad[r, j] * s
                dg = grad[r, j] * (z[r, j] + bias[j]) * s * (1.0 - s)
                dz[r, j] = da
                dz[r, c + j] = dg
                partial[blk, j] += da
                partial[blk, c + j] += dg
    return partial.sum(axis=0)


@row_kernel
def channel_mask_apply(x, mask, out):
    """out[b, l, h] = x[b, l, h] * mask[b, h]: a (batch, channel) mask shared over time."""
    batch, length, channels = x.shape
    for b in prange(batch):
        for t in range(length):
            for h in range(channels):
                out[b, t, h] = x[b, t, h] * mask[b, h]
