"""Numba kernels for the frequency-domain steps of the FFT convolution (``ssm.fftconv``).

Spectra are (batch, F, H) complex arrays (F = n/2 + 1 bins of an n-point real
FFT along the time axis) and the kernel's spectrum is (F, H). Each kernel is
one pass over its big operands; the batch reduction of the backward runs in
the same pass as the product for du, accumulated in complex128 per (bin,
channel) in a fixed batch order, so the result does not depend on the thread
count. float64 twins live in ``reference/ssm.py``.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from qs4d_np.kernels.elementwise import row_kernel


@row_kernel
def spectrum_product(u_f, K_f, out):
    """out = u_f * K_f (broadcast over the batch), then u_f := conj(u_f) in place.

    u_f and out (B, F, H), K_f (F, H). The backward only needs conj(u_f), so
    conjugating here saves it a pass.
    """
    batch, bins, channels = u_f.shape
    for b in prange(batch):
        for f in range(bins):
            for h in range(channels):
                v = u_f[b, f, h]
                out[b, f, h] = v * K_f[f, h]
                u_f[b, f, h] = v.conjugate()


@row_kernel
def spectrum_backward(g_f, u_f_conj, K_f, dK_f):
    """dK_f = sum_b g_f * u_f_conj, then g_f := g_f * conj(K_f) in place.

    g_f and u_f_conj (B, F, H), K_f (F, H); fills dK_f (F, H) complex128. The
    sum over the batch is the spectrum of dK[l] = sum_{b,t} g[b,t] u[b,t-l];
    the scaled g_f is the spectrum of du.
    """
    batch, bins, channels = g_f.shape
    for f in prange(bins):
        acc = np.zeros(channels, dtype=np.complex128)
        for b in range(batch):
            for h in range(channels):
                v = g_f[b, f, h]
                acc[h] += v * u_f_conj[b, f, h]
                g_f[b, f, h] = v * K_f[f, h].conjugate()
        for h in range(channels):
            dK_f[f, h] = acc[h]
