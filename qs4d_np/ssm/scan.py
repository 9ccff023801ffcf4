"""Checked entry points of the float recurrent scan (``kernels.scan``).

    y = scan(u, Abar, Bbar, C, D)                          # u (batch, L, H) -> y (batch, L, H)
    du, g_Abar, g_Bbar, g_C = scan_backward(u, dy, Abar, Bbar, C, D)

Abar, Bbar, C are (H, M) complex and D is (H,) real; the recurrence and its
adjoint are written out in ``kernels.scan``'s docstring. These wrappers check
the arrays, cast the parameters to u's precision as the kernels' real and
imaginary parts, and run the kernels on every Numba thread.
"""
from __future__ import annotations

import numba
import numpy as np

from qs4d_np.core.checks import check_array
from qs4d_np.kernels import scan as kern


def _parts(u: np.ndarray, Abar: np.ndarray, Bbar: np.ndarray, C: np.ndarray, D: np.ndarray) -> tuple:
    """Check the arguments; the parameters' real and imaginary parts, contiguous in u's dtype.

    The (H, M) parameters and D are checked for finite values (cheap); u is
    not: a pass over a (batch, L, H) activation costs as much as a scan step's
    memory traffic, and the public entry (``S4D.forward``) checks it once.
    """
    u = check_array("u", u, finite=False)
    if u.ndim != 3 or u.dtype not in (np.float32, np.float64):
        raise ValueError(f"u must be a float32/float64 array (batch, length, H), got {u.dtype} {u.shape}")
    H = u.shape[2]
    Abar = check_array("Abar", Abar, shape=(H, None), allow_complex=True)
    Bbar = check_array("Bbar", Bbar, shape=Abar.shape, allow_complex=True)
    C = check_array("C", C, shape=Abar.shape, allow_complex=True)
    D = check_array("D", D, shape=(H,))
    parts = [np.ascontiguousarray(p, dtype=u.dtype) for z in (Abar, Bbar, C) for p in (z.real, z.imag)]
    return (*parts, np.ascontiguousarray(D, dtype=u.dtype))


def scan(u: np.ndarray, Abar: np.ndarray, Bbar: np.ndarray, C: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Run the recurrence: u (batch, L, H) float -> y (batch, L, H) in u's dtype.

    Abar, Bbar, C are (H, M) complex, D is (H,) real, all finite; they are cast
    to u's precision. u's values are not checked for NaN/inf (see ``_parts``).
    """
    return kern.scan_forward(np.ascontiguousarray(u), *_parts(u, Abar, Bbar, C, D), numba.get_num_threads())


def scan_backward(u: np.ndarray, dy: np.ndarray, Abar: np.ndarray, Bbar: np.ndarray,
                  C: np.ndarray, D: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of the scan from dy = dL/dy (batch, L, H).

    Returns du (batch, L, H) in u's dtype and g_Abar, g_Bbar, g_C (H, M)
    complex128, summed over the batch (dL/dD = sum(dy*u) is left to the caller).
    Like u, dy is checked for shape only (``S4D.backward`` checks its values).
    """
    params = _parts(u, Abar, Bbar, C, D)
    dy = check_array("dy", dy, finite=False)
    if dy.shape != u.shape:
        raise ValueError(f"dy must have u's shape {u.shape}, got {dy.shape}")
    du, *parts = kern.scan_backward(np.ascontiguousarray(u), np.ascontiguousarray(dy, dtype=u.dtype),
                                    *params, numba.get_num_threads())
    sums = [p.sum(axis=0, dtype=np.float64) for p in parts]
    return du, sums[0] + 1j * sums[1], sums[2] + 1j * sums[3], sums[4] + 1j * sums[5]
