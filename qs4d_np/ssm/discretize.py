"""From S4D's continuous parameters to the discrete (Abar, Bbar), and back.

Shapes: H channels, M = N/2 complex modes.

    A    = -exp(log_A_real) + i*A_imag          (H, M)
    dt   = exp(log_dt)                           (H,)
    ZOH:      Abar = exp(dt*A),                  Bbar = (exp(dt*A) - 1)/A * B
    bilinear: Abar = (1 + dt*A/2)/(1 - dt*A/2),  Bbar = dt/(1 - dt*A/2) * B

Everything here runs in complex128 whatever the layer's dtype: the arrays are
only (H, M) large, and float32 would lose digits in exp(dt*A) - 1 for small dt
and in the cancelling terms of dBbar/dA.

Gradients use the convention g_z = dL/dRe(z) + i*dL/dIm(z). For a holomorphic
w = f(z) this chains as g_z = conj(f'(z)) * g_w, and for a real t,
dL/dt = Re(conj(f'(t)) * g_w).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DISCRETIZATIONS = ("zoh", "bilinear")


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


def discretize(log_dt: np.ndarray, log_A_real: np.ndarray, A_imag: np.ndarray,
               B: np.ndarray | None, method: str) -> DiscreteSSM:
    """Discretize with step dt = exp(log_dt); ``B=None`` means B = 1 (minimal S4D)."""
    dt = np.exp(log_dt.astype(np.float64))[:, None]
    A = continuous_A(log_A_real, A_imag)
    dtA = dt * A
    if method == "zoh":
        Abar = np.exp(dtA)
        Bbar0 = np.expm1(dtA) / A
    elif method == "bilinear":
        denom = 1.0 - dtA / 2
        Abar = (1.0 + dtA / 2) / denom
        Bbar0 = dt / denom
    else:
        raise ValueError(f"disc must be one of {list(DISCRETIZATIONS)}, got {method!r}")
    Bbar = Bbar0 if B is None else Bbar0 * B.astype(np.complex128)
    return DiscreteSSM(method, dt, A, Abar, Bbar0, Bbar)


def _derivatives(d: DiscreteSSM) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """dAbar/dA, dAbar/ddt, dBbar0/dA, dBbar0/ddt, each (H, M)."""
    dt, A = d.dt, d.A
    if d.method == "zoh":
        E = d.Abar
        return dt * E, A * E, (dt * E * A - (E - 1.0)) / A**2, E
    inv = 1.0 / (1.0 - dt * A / 2) ** 2
    return dt * inv, A * inv, dt**2 / 2 * inv, inv


def discretize_backward(d: DiscreteSSM, B: np.ndarray | None, g_Abar: np.ndarray,
                        g_Bbar: np.ndarray) -> dict[str, np.ndarray]:
    """Chain g_Abar, g_Bbar (H, M) back to the continuous parameters.

    Returns float64/complex128 gradients keyed ``log_dt`` (H,), ``log_A_real``,
    ``A_imag`` (H, M) and, when ``B`` is given, ``B`` (H, M).
    """
    dAbar_dA, dAbar_ddt, dBbar0_dA, dBbar0_ddt = _derivatives(d)
    grads: dict[str, np.ndarray] = {}
    if B is None:
        g_Bbar0 = g_Bbar
    else:
        g_Bbar0 = np.conj(B.astype(np.complex128)) * g_Bbar
        grads["B"] = np.conj(d.Bbar0) * g_Bbar
    g_A = np.conj(dAbar_dA) * g_Abar + np.conj(dBbar0_dA) * g_Bbar0
    g_dt = np.real(np.conj(dAbar_ddt) * g_Abar + np.conj(dBbar0_ddt) * g_Bbar0).sum(axis=1)
    grads["log_dt"] = g_dt * d.dt[:, 0]
    grads["log_A_real"] = np.real(g_A) * np.real(d.A)  # dRe(A)/dlog_A_real = Re(A)
    grads["A_imag"] = np.imag(g_A)
    return grads
