"""From S4D's continuous parameters to the discrete (Abar, Bbar), and back.

Shapes: H channels, M = N/2 complex modes.

    A    = -exp(log_A_real) + i*A_imag          (H, M)
    dt   = exp(log_dt)                           (H,)
    ZOH:      Abar = exp(dt*A),                  Bbar = (exp(dt*A) - 1)/A * B
    bilinear: Abar = (1 + dt*A/2)/(1 - dt*A/2),  Bbar = dt/(1 - dt*A/2) * B

Everything here runs in complex128 whatever the layer's dtype (the arrays are
only (H, M) large). complex128 alone does not save ZOH from cancellation: with
z = dt*A, Bbar0 = dt*phi1(z) and dBbar0/dA = dt**2*psi(z), where

    phi1(z) = (e^z - 1)/z                  = sum_{k>=0} z^k/(k+1)!
    psi(z)  = (z*e^z - (e^z - 1))/z**2     = sum_{k>=0} (k+1)*z^k/(k+2)!

and the closed form of psi subtracts two O(z) terms to get an O(z**2) result,
losing ~log10(1/|z|) digits (relative error 3e-5 at dt = 1e-3, A = -1e-3), and
both closed forms are 0/0 at A = 0 (a quantized mode can round there). So
``zoh_phi1`` and ``zoh_psi`` sum the Taylor series for |z| <= 1.5 (giving the
limits phi1(0) = 1, psi(0) = 1/2 exactly at A = 0) and use the closed forms
outside. The switch point is where the two branches' worst relative
errors over the left half-plane cross (measured against a 60-digit ``decimal``
series, ``reference.ssm.zoh_factors_decimal``): at |z| = 1.5 the closed form
of psi is within 5.2e-16 and the 24-term series within 4.2e-16; below it the
closed form degrades (1e-15 at |z| = 1, 2e-15 at 0.25, ~eps/|z| further down),
above it the series' rounding grows with |z|. The truncation error of 24
terms at |z| = 1.5 is ~1e-21. Bilinear needs no such care: its only
subtraction, 1 - z/2, has |1 - z/2| >= 1 for Re(A) <= 0.

Gradients use the convention g_z = dL/dRe(z) + i*dL/dIm(z). For a holomorphic
w = f(z) this chains as g_z = conj(f'(z)) * g_w, and for a real t,
dL/dt = Re(conj(f'(t)) * g_w).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qs4d_np.core.checks import check_array, check_choice

DISCRETIZATIONS = ("zoh", "bilinear")

_SERIES_RADIUS = 1.5  # |z| at or below which the Taylor series is used (module docstring)
_SERIES_TERMS = 24
_PHI1_COEFFS = tuple(1.0 / math.factorial(k + 1) for k in range(_SERIES_TERMS))
_PSI_COEFFS = tuple((k + 1) / math.factorial(k + 2) for k in range(_SERIES_TERMS))


@dataclass(frozen=True)
class DiscreteSSM:
    """The discretized SSM of one layer and the intermediates its backward needs.

    dt (H, 1) float64; A, Abar, Bbar0, Bbar (H, M) complex128. ``Bbar0`` is the
    input matrix for B = 1, so ``Bbar = Bbar0 * B``.
    """

    method: str
    dt: np.ndarray
    A: np.ndarray
    Abar: np.ndarray
    Bbar0: np.ndarray
    Bbar: np.ndarray


def continuous_A(log_A_real: np.ndarray, A_imag: np.ndarray) -> np.ndarray:
    """A = -exp(log_A_real) + i*A_imag, (H, M) complex128."""
    return -np.exp(log_A_real.astype(np.float64)) + 1j * A_imag.astype(np.float64)


def _series_or_closed(z: np.ndarray, coeffs: tuple[float, ...], closed) -> np.ndarray:
    """sum_k coeffs[k]*z**k (Horner) where |z| <= _SERIES_RADIUS, closed(z) elsewhere; complex128."""
    z = np.asarray(z, dtype=np.complex128)
    out = np.empty_like(z)
    small = np.abs(z) <= _SERIES_RADIUS
    # each branch sees only its own entries: no 0/0 in the closed form, no overflowing powers in the series
    z_small = z[small]
    acc = np.full_like(z_small, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc *= z_small
        acc += c
    out[small] = acc
    large = ~small
    out[large] = closed(z[large])
    return out


def zoh_phi1(z: np.ndarray) -> np.ndarray:
    """phi1(z) = (e^z - 1)/z (module docstring), elementwise; phi1(0) = 1."""
    return _series_or_closed(z, _PHI1_COEFFS, lambda w: np.expm1(w) / w)


def zoh_psi(z: np.ndarray) -> np.ndarray:
    """psi(z) = (z*e^z - (e^z - 1))/z**2 (module docstring), elementwise; psi(0) = 1/2.

    Like ``zoh_phi1`` accurate to ~5e-16 relative for Re(z) <= 0 (stable modes)
    except near the function's complex zeros, where no formula keeps relative accuracy.
    """
    return _series_or_closed(z, _PSI_COEFFS, lambda w: (w * np.exp(w) - np.expm1(w)) / w**2)


def discretize(log_dt: np.ndarray, log_A_real: np.ndarray, A_imag: np.ndarray,
               B: np.ndarray | None, method: str) -> DiscreteSSM:
    """Discretize with step dt = exp(log_dt); ``B=None`` means B = 1 (minimal S4D).

    log_dt (H,), log_A_real and A_imag (H, M) real, B (H, M) complex or None;
    all must be finite (they are small, so the check is cheap).
    """
    log_dt = check_array("log_dt", log_dt, ndim=1)
    H = log_dt.shape[0]
    log_A_real = check_array("log_A_real", log_A_real, shape=(H, None))
    M = log_A_real.shape[1]
    A_imag = check_array("A_imag", A_imag, shape=(H, M))
    if B is not None:
        B = check_array("B", B, shape=(H, M), allow_complex=True)
    return discretize_dt_A(np.exp(log_dt.astype(np.float64)), continuous_A(log_A_real, A_imag), B, method)


def discretize_dt_A(dt: np.ndarray, A: np.ndarray, B: np.ndarray | None, method: str) -> DiscreteSSM:
    """The discretization itself from dt (H,) or (H, 1) and A (H, M) complex; ``B=None`` means B = 1.

    Only ``method`` is checked here; the arrays are the caller's to check
    (``discretize`` does). A = 0 is allowed: ZOH takes the limits Bbar0 = dt,
    dBbar0/dA = dt**2/2.
    """
    check_choice("method", method, DISCRETIZATIONS)
    dt = np.asarray(dt, dtype=np.float64).reshape(-1, 1)
    A = np.asarray(A, dtype=np.complex128)
    dtA = dt * A
    if method == "zoh":
        Abar = np.exp(dtA)
        Bbar0 = dt * zoh_phi1(dtA)
    else:
        denom = 1.0 - dtA / 2
        Abar = (1.0 + dtA / 2) / denom
        Bbar0 = dt / denom
    Bbar = Bbar0 if B is None else Bbar0 * B.astype(np.complex128)
    return DiscreteSSM(method, dt, A, Abar, Bbar0, Bbar)


def derivatives(d: DiscreteSSM) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """dAbar/dA, dAbar/ddt, dBbar0/dA, dBbar0/ddt, each (H, M) complex128."""
    dt, A = d.dt, d.A
    if d.method == "zoh":
        E = d.Abar
        return dt * E, A * E, dt**2 * zoh_psi(dt * A), E
    inv = 1.0 / (1.0 - dt * A / 2) ** 2
    return dt * inv, A * inv, dt**2 / 2 * inv, inv


def discretize_dt_A_backward(d: DiscreteSSM, B: np.ndarray | None, g_Abar: np.ndarray,
                             g_Bbar: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(dL/ddt (H,), dL/dA (H, M) complex, dL/dB (H, M) or None) from g_Abar, g_Bbar (H, M).

    The backward of ``discretize_dt_A``: what a quantized A's straight-through
    backward needs (``discretize_backward`` chains on to log_dt, log_A_real, A_imag).
    """
    dAbar_dA, dAbar_ddt, dBbar0_dA, dBbar0_ddt = derivatives(d)
    g_B = None
    g_Bbar0 = g_Bbar
    if B is not None:
        g_Bbar0 = np.conj(B.astype(np.complex128)) * g_Bbar
        g_B = np.conj(d.Bbar0) * g_Bbar
    g_A = np.conj(dAbar_dA) * g_Abar + np.conj(dBbar0_dA) * g_Bbar0
    g_dt = np.real(np.conj(dAbar_ddt) * g_Abar + np.conj(dBbar0_ddt) * g_Bbar0).sum(axis=1)
    return g_dt, g_A, g_B


def discretize_backward(d: DiscreteSSM, B: np.ndarray | None, g_Abar: np.ndarray,
                        g_Bbar: np.ndarray) -> dict[str, np.ndarray]:
    """Chain g_Abar, g_Bbar (H, M) back to the continuous parameters.

    Returns float64/complex128 gradients keyed ``log_dt`` (H,), ``log_A_real``,
    ``A_imag`` (H, M) and, when ``B`` is given, ``B`` (H, M).
    """
    g_dt, g_A, g_B = discretize_dt_A_backward(d, B, g_Abar, g_Bbar)
    grads: dict[str, np.ndarray] = {} if g_B is None else {"B": g_B}
    grads["log_dt"] = g_dt * d.dt[:, 0]
    grads["log_A_real"] = np.real(g_A) * np.real(d.A)  # dRe(A)/dlog_A_real = Re(A)
    grads["A_imag"] = np.imag(g_A)
    return grads
