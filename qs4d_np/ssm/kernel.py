"""The S4D convolution kernel K[h, l] = 2*Re(sum_n Ct[h, n] * Abar[h, n]**l) and its gradients.

Ct = C*Bbar folds the input and output matrices. The powers Abar**l for
l < L are never stored as an (H, M, L) tensor: with l = J*k + j (j < J,
k < ceil(L/J), J ~ sqrt(L)) every power is a product of a "small" power
Abar**j and a "big" power Abar**(J*k), so the Vandermonde products become
batched matrix products of (H, M, J) and (H, M, ceil(L/J)) factors. Powers come
from repeated multiplication (no logarithm, so Abar = 0 is fine); in float64 the
relative error grows at most ~L ulp.

Work is done in complex128 whatever the layer's dtype; the arrays are small and
the matrix products cost a few MFLOP.
"""
from __future__ import annotations

import math

import numpy as np


def _powers(base: np.ndarray, count: int) -> np.ndarray:
    """base**0 .. base**(count-1) along a new last axis; base (H, M) complex."""
    out = np.empty(base.shape + (count,), dtype=np.complex128)
    out[..., 0] = 1.0
    for p in range(1, count):
        out[..., p] = out[..., p - 1] * base
    return out


def _block_powers(Abar: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """Small powers S = Abar**j (H, M, J) and big powers Q = Abar**(J*k) (H, M, Kb)."""
    J = math.isqrt(L - 1) + 1                           # ceil(sqrt(L)) for L >= 1
    S = _powers(Abar, J)
    Q = _powers(S[..., -1] * Abar, -(-L // J))
    return S, Q


def vandermonde(coef: np.ndarray, Abar: np.ndarray, L: int) -> np.ndarray:
    """sum_n coef[h, n] * Abar[h, n]**l for l < L, (H, L) complex128."""
    S, Q = _block_powers(Abar, L)
    H = S.shape[0]
    R = np.swapaxes(coef[..., None] * Q, 1, 2)          # (H, Kb, M)
    return (R @ S).reshape(H, -1)[:, :L]                 # (H, Kb, J) -> (H, Kb*J)


def vandermonde_adjoint(G: np.ndarray, Abar: np.ndarray) -> np.ndarray:
    """sum_l G[h, l] * Abar[h, n]**l, (H, M) complex128; G (H, L) real."""
    H, L = G.shape
    S, Q = _block_powers(Abar, L)
    J, Kb = S.shape[2], Q.shape[2]
    Gpad = np.zeros((H, Kb * J), dtype=np.float64)
    Gpad[:, :L] = G
    T = S @ np.swapaxes(Gpad.reshape(H, Kb, J), 1, 2)    # (H, M, Kb)
    return np.einsum("hmk,hmk->hm", T, Q)


def ssm_kernel(Ct: np.ndarray, Abar: np.ndarray, L: int) -> np.ndarray:
    """K (H, L) float64 from Ct = C*Bbar and Abar, both (H, M) complex."""
    return 2.0 * vandermonde(Ct, Abar, L).real


def ssm_kernel_backward(G: np.ndarray, Ct: np.ndarray, Abar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(g_Ct, g_Abar) (H, M) complex128 from G = dL/dK (H, L).

    With V = sum_l G_l Abar**l and U' = sum_l l*G_l Abar**(l-1):
    g_Ct = 2*conj(V) and g_Abar = 2*conj(Ct*U'). U' is the adjoint Vandermonde
    of the shifted weights (l+1)*G_{l+1}, so no division by Abar is needed.
    """
    H, L = G.shape
    V = vandermonde_adjoint(G, Abar)
    if L > 1:
        Gshift = np.arange(1, L, dtype=np.float64) * G[:, 1:]
        Uprime = vandermonde_adjoint(Gshift, Abar)
    else:
        Uprime = np.zeros_like(V)
    return 2.0 * np.conj(V), 2.0 * np.conj(Ct * Uprime)
