"""Discretization pieces the quantized S4D layer needs beyond ``qs4d_np.ssm.discretize``.

* ``discretize_A``: (dt, A) -> (Abar, Bbar) when A itself is quantized (the
  reference quantizes Re(A) and Im(A) before discretizing). ``ssm.discretize``
  starts from ``log_A_real``, which a quantized Re(A) = 0 has no value for, and
  its backward returns dL/dlog_A_real, not the dL/dA the quantizer's
  straight-through backward needs. A = 0 (a quantized mode that rounded to
  zero) takes the ZOH limits Bbar0 = dt, dBbar0/dA = dt**2/2 instead of 0/0.
* ``polar_abar`` / ``polar_params``: the ``discrete`` Abar parameterization,
  Abar = exp(-softplus(rho) + i*theta), so |Abar| = exp(-softplus(rho)) < 1 for any
  (rho, theta): Abar is learned directly and stays inside the unit circle
  whatever the optimizer does.

Shapes: H channels, M modes; dt (H, 1) float64, A / Abar (H, M) complex128.
Gradient convention g_z = dL/dRe(z) + i*dL/dIm(z) (as ``ssm.discretize``).
"""
from __future__ import annotations

import numpy as np

from qs4d_np.ssm.discretize import DiscreteSSM


def discretize_A(dt: np.ndarray, A: np.ndarray, B: np.ndarray | None, method: str) -> DiscreteSSM:
    """ZOH or bilinear discretization of (dt (H, 1), A (H, M)); ``B=None`` means B = 1."""
    dt = np.asarray(dt, dtype=np.float64).reshape(-1, 1)
    A = np.asarray(A, dtype=np.complex128)
    dtA = dt * A
    if method == "zoh":
        Abar = np.exp(dtA)
        nonzero = A != 0
        Bbar0 = np.where(nonzero, np.expm1(dtA) / np.where(nonzero, A, 1.0), dt + 0j)
    else:
        denom = 1.0 - dtA / 2
        Abar = (1.0 + dtA / 2) / denom
        Bbar0 = dt / denom
    Bbar = Bbar0 if B is None else Bbar0 * B.astype(np.complex128)
    return DiscreteSSM(method, dt, A, Abar, Bbar0, Bbar)


def discretize_A_backward(d: DiscreteSSM, B: np.ndarray | None, g_Abar: np.ndarray,
                          g_Bbar: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(dL/ddt (H,), dL/dA (H, M) complex, dL/dB or None) from g_Abar, g_Bbar (H, M)."""
    dt, A, E = d.dt, d.A, d.Abar
    if d.method == "zoh":
        nonzero = A != 0
        A_safe = np.where(nonzero, A, 1.0)
        dAbar_dA, dAbar_ddt, dBbar0_ddt = dt * E, A * E, E
        dBbar0_dA = np.where(nonzero, (dt * E * A - (E - 1.0)) / A_safe**2, dt**2 / 2 + 0j)
    else:
        inv = 1.0 / (1.0 - dt * A / 2) ** 2
        dAbar_dA, dAbar_ddt, dBbar0_dA, dBbar0_ddt = dt * inv, A * inv, dt**2 / 2 * inv, inv
    g_B = None
    g_Bbar0 = g_Bbar
    if B is not None:
        g_Bbar0 = np.conj(B.astype(np.complex128)) * g_Bbar
        g_B = np.conj(d.Bbar0) * g_Bbar
    g_A = np.conj(dAbar_dA) * g_Abar + np.conj(dBbar0_dA) * g_Bbar0
    g_dt = np.real(np.conj(dAbar_ddt) * g_Abar + np.conj(dBbar0_ddt) * g_Bbar0).sum(axis=1)
    return g_dt, g_A, g_B


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def polar_abar(rho: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Abar = exp(-softplus(rho) + i*theta), (H, M) complex128, |Abar| < 1."""
    return np.exp(-_softplus(rho.astype(np.float64)) + 1j * theta.astype(np.float64))


def polar_backward(rho: np.ndarray, Abar: np.ndarray, g_Abar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dL/drho, dL/dtheta) from g_Abar: dAbar/drho = -sigmoid(rho)*Abar, dAbar/dtheta = i*Abar."""
    w = np.real(np.conj(Abar) * g_Abar)  # Re(conj(Abar) g): the log-radius direction
    sigmoid = 0.5 * (1.0 + np.tanh(0.5 * rho.astype(np.float64)))
    return -sigmoid * w, np.real(np.conj(1j * Abar) * g_Abar)


def polar_params(Abar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rho, theta) with polar_abar(rho, theta) = Abar; needs 0 < |Abar| < 1."""
    r = np.abs(Abar)
    if not ((r > 0) & (r < 1)).all():
        raise ValueError(f"the discrete parameterization needs 0 < |Abar| < 1, got |Abar| in "
                         f"[{r.min():.6g}, {r.max():.6g}]")
    # softplus(rho) = -log r  ->  rho = log(expm1(-log r))
    return np.log(np.expm1(-np.log(r))), np.angle(Abar)
