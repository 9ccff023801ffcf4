"""Loop-based float64 twins of the S4D layer's fast paths.

Each function follows the textbook formula as literally as possible; the
tests compare the fast implementations (block-power Vandermonde, FFT
convolution, Numba scan) with these.
"""
from __future__ import annotations

import numpy as np
from scipy.linalg import expm


def kernel_explicit(C: np.ndarray, Bbar: np.ndarray, Abar: np.ndarray, L: int) -> np.ndarray:
    """K[h, l] = 2*Re(sum_n C*Bbar*Abar**l) with explicit powers, (H, L) float64."""
    H, M = Abar.shape
    K = np.zeros((H, L))
    for h in range(H):
        for n in range(M):
            for l in range(L):
                K[h, l] += 2 * (C[h, n] * Bbar[h, n] * Abar[h, n] ** l).real
    return K


def causal_conv_direct(u: np.ndarray, K: np.ndarray) -> np.ndarray:
    """y[b, t, h] = sum_{s <= t} K[h, t - s]*u[b, s, h] by a double loop."""
    batch, L, H = u.shape
    y = np.zeros((batch, L, H))
    for t in range(L):
        for s in range(t + 1):
            y[:, t, :] += K[:, t - s] * u[:, s, :]
    return y


def scan_naive(u: np.ndarray, Abar: np.ndarray, Bbar: np.ndarray, C: np.ndarray,
               D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The recurrence step by step in complex128: y (batch, L, H) and states (batch, L, H, M)."""
    batch, L, H = u.shape
    x = np.zeros((batch, H, Abar.shape[1]), dtype=np.complex128)
    y = np.zeros((batch, L, H))
    states = np.zeros((batch, L, H, Abar.shape[1]), dtype=np.complex128)
    for t in range(L):
        x = Abar * x + Bbar * u[:, t, :, None]
        states[:, t] = x
        y[:, t] = 2 * np.sum(C * x, axis=-1).real + D * u[:, t]
    return y, states


def scan_backward_naive(u: np.ndarray, dy: np.ndarray, Abar: np.ndarray, Bbar: np.ndarray,
                        C: np.ndarray, D: np.ndarray) -> tuple[np.ndarray, ...]:
    """Adjoint of ``scan_naive`` with stored states (fine at test sizes).

    Returns du (batch, L, H), g_Abar, g_Bbar, g_C (H, M) complex128 summed over
    the batch, and g_D (H,).
    """
    batch, L, H = u.shape
    _, states = scan_naive(u, Abar, Bbar, C, D)
    lam = np.zeros((batch, H, Abar.shape[1]), dtype=np.complex128)
    du = np.zeros((batch, L, H))
    g_Abar = np.zeros(Abar.shape, dtype=np.complex128)
    g_Bbar = np.zeros_like(g_Abar)
    g_C = np.zeros_like(g_Abar)
    for t in reversed(range(L)):
        g = dy[:, t, :, None]
        lam = 2 * g * np.conj(C) + np.conj(Abar) * lam
        du[:, t] = np.sum(np.conj(Bbar) * lam, axis=-1).real + D * dy[:, t]
        x_prev = states[:, t - 1] if t > 0 else np.zeros_like(lam)
        g_Abar += np.sum(np.conj(x_prev) * lam, axis=0)
        g_Bbar += np.sum(u[:, t, :, None] * lam, axis=0)
        g_C += np.sum(2 * g * np.conj(states[:, t]), axis=0)
    g_D = np.sum(dy * u, axis=(0, 1))
    return du, g_Abar, g_Bbar, g_C, g_D


def zoh_expm(dt: np.ndarray, A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ZOH by Van Loan's augmented exponential: expm([[A, B], [0, 0]] dt) = [[Abar, Bbar], [0, 1]].

    dt (H,), A and B (H, M) complex; one 2x2 scipy.linalg.expm per mode.
    """
    Abar = np.zeros(A.shape, dtype=np.complex128)
    Bbar = np.zeros(A.shape, dtype=np.complex128)
    for h in range(A.shape[0]):
        for n in range(A.shape[1]):
            E = expm(np.array([[A[h, n], B[h, n]], [0.0, 0.0]], dtype=np.complex128) * dt[h])
            Abar[h, n], Bbar[h, n] = E[0, 0], E[0, 1]
    return Abar, Bbar


def spectrum_product(u_f: np.ndarray, K_f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u_f * K_f, conj(u_f)) in complex128; u_f (B, F, H), K_f (F, H)."""
    u_f = np.asarray(u_f, dtype=np.complex128)
    return u_f * np.asarray(K_f, dtype=np.complex128), np.conj(u_f)


def spectrum_backward(g_f: np.ndarray, u_f_conj: np.ndarray, K_f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum over the batch of g_f * u_f_conj (F, H), g_f * conj(K_f) (B, F, H)) in complex128."""
    g_f = np.asarray(g_f, dtype=np.complex128)
    dK_f = np.sum(g_f * np.asarray(u_f_conj, dtype=np.complex128), axis=0)
    return dK_f, g_f * np.conj(np.asarray(K_f, dtype=np.complex128))


def vandermonde_adjoint_explicit(G: np.ndarray, Abar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """V = sum_l G[h, l]*Abar**l and dV/dAbar = sum_{l>=1} l*G[h, l]*Abar**(l-1) by explicit powers."""
    H, L = G.shape
    V = np.zeros(Abar.shape, dtype=np.complex128)
    dV = np.zeros_like(V)
    for l in range(L):
        V += G[:, l, None] * Abar ** l
        if l >= 1:
            dV += l * G[:, l, None] * Abar ** (l - 1)
    return V, dV
