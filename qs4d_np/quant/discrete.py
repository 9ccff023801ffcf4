"""The ``discrete`` Abar parameterization of the quantized S4D layer.

``polar_abar`` / ``polar_params``: Abar = exp(-softplus(rho) + i*theta), so
|Abar| = exp(-softplus(rho)) < 1 for any (rho, theta): Abar is learned directly
and stays inside the unit circle whatever the optimizer does. (When A itself is
quantized, the layer discretizes with ``ssm.discretize.discretize_dt_A`` and
its backward, which start from A rather than log_A_real and take the ZOH
limits at A = 0.)

Shapes: H channels, M modes; Abar (H, M) complex128.
Gradient convention g_z = dL/dRe(z) + i*dL/dIm(z) (as ``ssm.discretize``).
"""
from __future__ import annotations

import numpy as np


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
