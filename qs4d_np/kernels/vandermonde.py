"""Numba kernels for the S4D convolution kernel and its adjoint (``ssm.kernel``), complex128.

Both walk the powers Abar**l one step at a time per (channel, mode), with
the modes as the inner, vectorizable loop and the channels split over
threads. Relative rounding error grows ~L ulp (one rounded product per
step), ~1e-13 at L = 1000 in float64. Loop-based twins live in
``reference/ssm.py``.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from qs4d_np.kernels.elementwise import row_kernel


@row_kernel
def kernel_from_modes(out, Ct, Abar):
    """out[h, l] = 2 * Re(sum_m Ct[h, m] * Abar[h, m]**l); out (H, L) float64, Ct and Abar (H, M)."""
    channels, length = out.shape
    modes = Ct.shape[1]
    for h in prange(channels):
        term = Ct[h].copy()  # Ct * Abar**l for the current l
        for l in range(length):
            s = 0.0
            for m in range(modes):
                s += term[m].real
                term[m] *= Abar[h, m]
            out[h, l] = 2.0 * s


@row_kernel
def adjoint_sums(G, Abar, V, dV):
    """V = sum_l G[h, l] Abar**l and dV = dV/dAbar = sum_l l G[h, l] Abar**(l-1), each (H, M).

    Horner from the last lag: V_k = G_k + Abar V_{k+1} and
    V'_k = V_{k+1} + Abar V'_{k+1}, so no power and no division by Abar is formed.
    """
    channels, length = G.shape
    modes = Abar.shape[1]
    for h in prange(channels):
        v = np.zeros(modes, dtype=np.complex128)
        dv = np.zeros(modes, dtype=np.complex128)
        for l in range(length - 1, -1, -1):
            g = G[h, l]
            for m in range(modes):
                a = Abar[h, m]
                dv[m] = dv[m] * a + v[m]
                v[m] = v[m] * a + g
        for m in range(modes):
            V[h, m] = v[m]
            dV[h, m] = dv[m]
