"""Numba kernels for the FFT convolution (``ssm.fftconv``): layout swaps and frequency-domain steps.

The convolution transforms along a contiguous last axis: activations
(batch, length, H) are swapped to (batch, H, length) first, and the inverse
transforms' (batch, H, n) outputs are swapped back (``swap_axes``). Spectra
are then (batch, H, F) complex (F = n/2 + 1 bins) and the kernel's spectrum
is (H, F); the spectrum kernels only need the kernel's spectrum to match
the last two axes. Each kernel is one pass over its big operands; the batch
reduction of the backward runs in the same pass as the product for du,
accumulated in complex128 in a fixed batch order, so the result does not
depend on the thread count. float64 twins live in ``reference/ssm.py``.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from qs4d_np.kernels.elementwise import row_kernel

# Rows of ``out`` written together by ``swap_axes``: each read of x then
# fetches SWAP_ROWS consecutive values (a 32-byte float32 run) instead of one.
SWAP_ROWS = 8


@row_kernel
def swap_axes(x, out):
    """out[b, i, j] = x[b, j, i] for the i < out.shape[1], j < out.shape[2] (x may be longer on axis 2)."""
    batch, rows, cols = out.shape
    full = rows - rows % SWAP_ROWS
    for b in prange(batch):
        for i0 in range(0, full, SWAP_ROWS):
            for j in range(cols):
                for i in range(i0, i0 + SWAP_ROWS):
                    out[b, i, j] = x[b, j, i]
        for i in range(full, rows):
            for j in range(cols):
                out[b, i, j] = x[b, j, i]


@row_kernel
def spectrum_product(u_f, K_f, out):
    """out = u_f * K_f (broadcast over the batch), then u_f := conj(u_f) in place.

    u_f and out (B, X, Y), K_f (X, Y). The backward only needs conj(u_f), so
    conjugating here saves it a pass.
    """
    batch, rows, cols = u_f.shape
    for b in prange(batch):
        for r in range(rows):
            for c in range(cols):
                v = u_f[b, r, c]
                out[b, r, c] = v * K_f[r, c]
                u_f[b, r, c] = v.conjugate()


@row_kernel
def spectrum_backward(g_f, u_f_conj, K_f, dK_f):
    """dK_f = sum_b g_f * u_f_conj, then g_f := g_f * conj(K_f) in place.

    g_f and u_f_conj (B, X, Y), K_f (X, Y); fills dK_f (X, Y) complex128. The
    sum over the batch is the spectrum of dK[l] = sum_{b,t} g[b,t] u[b,t-l];
    the scaled g_f is the spectrum of du.
    """
    batch, rows, cols = g_f.shape
    for r in prange(rows):
        acc = np.zeros(cols, dtype=np.complex128)
        for b in range(batch):
            for c in range(cols):
                v = g_f[b, r, c]
                acc[c] += v * u_f_conj[b, r, c]
                g_f[b, r, c] = v * K_f[r, c].conjugate()
        for c in range(cols):
            dK_f[r, c] = acc[c]
