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


def zoh_factors_decimal(z: complex, digits: int = 60) -> tuple[complex, complex]:
    """(phi1(z), psi(z)) for one complex z by their Taylor series in ``decimal`` arithmetic.

    phi1(z) = (e^z - 1)/z = sum_{k>=0} z^k/(k+1)!, so ZOH's Bbar0 = dt*phi1(dt*A);
    psi(z) = (z*e^z - (e^z - 1))/z^2 = sum_{k>=0} (k+1) z^k/(k+2)!, so
    dBbar0/dA = dt^2*psi(dt*A). ``z`` is taken exactly (a float is a finite
    binary fraction). The terms grow to ~e^|z| before they shrink, so the
    working precision is ``digits`` plus the 0.44*|z| digits they cancel; the
    sums are then exact far below float64 rounding.
    """
    from decimal import Decimal, localcontext

    with localcontext() as ctx:
        mod = abs(z)
        ctx.prec = digits + int(0.44 * mod)
        zr, zi = Decimal(z.real), Decimal(z.imag)
        tiny = Decimal(10) ** (-digits + 10)
        # q_k = z^k/(k+1)!, p_k = z^k/(k+2)!, updated by one complex product per term
        qr, qi, pr, pi_ = Decimal(1), Decimal(0), Decimal(1) / 2, Decimal(0)
        s1r, s1i, s2r, s2i = qr, qi, pr, pi_
        k = 0
        while True:
            k += 1
            qr, qi = (qr * zr - qi * zi) / (k + 1), (qr * zi + qi * zr) / (k + 1)
            pr, pi_ = (pr * zr - pi_ * zi) / (k + 2), (pr * zi + pi_ * zr) / (k + 2)
            s1r, s1i = s1r + qr, s1i + qi
            s2r, s2i = s2r + (k + 1) * pr, s2i + (k + 1) * pi_
            if k > 2 * mod + 5 and abs(qr) + abs(qi) + (k + 1) * (abs(pr) + abs(pi_)) < tiny:
                break
        return complex(float(s1r), float(s1i)), complex(float(s2r), float(s2i))


def bilinear_exact(dt: float, A: complex) -> dict[str, complex]:
    """Bilinear Abar, Bbar0 and their derivatives for one mode in exact rational arithmetic.

    With w = 1 - dt*A/2: Abar = (2 - w)/w, Bbar0 = dt/w, dAbar/dA = dt/w^2,
    dAbar/ddt = A/w^2, dBbar0/dA = dt^2/(2 w^2), dBbar0/ddt = 1/w^2. The float
    inputs are exact binary fractions, so only the final rounding to complex is inexact.
    """
    from fractions import Fraction

    def mul(a, b):
        return (a[0] * b[0] - a[1] * b[1], a[0] * b[1] + a[1] * b[0])

    def div(a, b):
        den = b[0] ** 2 + b[1] ** 2
        return ((a[0] * b[0] + a[1] * b[1]) / den, (a[1] * b[0] - a[0] * b[1]) / den)

    t = (Fraction(dt), Fraction(0))
    a = (Fraction(A.real), Fraction(A.imag))
    ta = mul(t, a)
    w = (1 - ta[0] / 2, -ta[1] / 2)
    w2 = mul(w, w)
    exact = {"Abar": div((2 - w[0], -w[1]), w), "Bbar0": div(t, w), "dAbar_dA": div(t, w2),
             "dAbar_ddt": div(a, w2), "dBbar0_dA": div((t[0] ** 2 / 2, Fraction(0)), w2),
             "dBbar0_ddt": div((Fraction(1), Fraction(0)), w2)}
    return {k: complex(float(v[0]), float(v[1])) for k, v in exact.items()}
