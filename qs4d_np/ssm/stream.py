"""Streaming pieces of the S4D core: the zero state, step-input checks and ``CoreStep``, the
evaluation-mode recurrent core frozen for one time step at a time (``S4DCore.frozen``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qs4d_np.core.checks import check_array, check_int
from qs4d_np.quant.frozen import FrozenQuant


def zero_state(batch: int, d_model: int, d_state: int, dtype: np.dtype, mode_major: bool = False) -> np.ndarray:
    """The zero SSM state (batch, d_model, d_state/2) in ``dtype``'s complex dtype; ``mode_major``:
    (d_state/2, batch, d_model), the layout of ``S4DStepper``."""
    batch = check_int("batch", batch, min_value=1)
    shape = (d_state // 2, batch, d_model) if mode_major else (batch, d_model, d_state // 2)
    return np.zeros(shape, dtype=np.result_type(dtype, np.complex64))


def check_step(u_t: object, state: object, d_model: int, d_state: int, dtype: np.dtype,
               name: str = "u_t", mode_major: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Check one step's input ``name`` (batch, d_model) (finite) and state (batch, d_model,
    d_state/2), or (d_state/2, batch, d_model) when ``mode_major`` (complex or real, finite);
    return them in ``dtype`` and its complex dtype."""
    u_t = check_array(name, u_t, ndim=2)
    if u_t.shape[1] != d_model:
        raise ValueError(f"{name} must have shape (batch, {d_model}), got {u_t.shape}")
    B, M = u_t.shape[0], d_state // 2
    state = check_array("state", state, shape=(M, B, d_model) if mode_major else (B, d_model, M),
                        allow_complex=True)
    cdtype = np.result_type(dtype, np.complex64)
    return u_t.astype(dtype, copy=False), state.astype(cdtype, copy=False)


@dataclass(frozen=True)
class CoreStep:
    """One layer's evaluation-mode recurrent SSM core, frozen for streaming (``S4DCore.frozen``).

    ``Abar``, ``Bbar``, ``C``: the (quantized) parameters (H, M) in the layer's complex dtype;
    ``D`` (H,) in its dtype. ``clip``: the state bound (inf when only the state is quantized), or
    None when the forward runs the float scan (no state target, no clip). ``state``: the state
    quantizer of the real and of the imaginary part (``FrozenQuant``, codes per unit (H,)), or
    None for a float state. The arrays are read-only copies: a stream never sees a later change
    of the layer.

    ``step(u_t, state)``: u_t (batch, H) in the layer's dtype and the state **mode-major**, (M,
    batch, H) in its complex dtype, so that every elementwise pass and each mode's read-out add
    runs over contiguous memory (unchecked: the callers check). Returns y_t (batch, H) in the
    layer's dtype (the core output, D*u_t included) and the new state (M, batch, H). With a clip
    this is ``kernels.quant_scan``'s documented per-step order on real and imaginary planes,
    vectorised over batch and channels: state update in the layer dtype, clip, round / saturate /
    divide, read-out accumulated in float64 over the modes in order 0..M-1 (one add per mode), so
    it reproduces the forward bit for bit. Without a clip the forward runs ``kernels.scan``, whose
    sums may be reassociated (fastmath): the step then uses complex arithmetic and a summed
    read-out and agrees with it to rounding only.
    """

    Abar: np.ndarray
    Bbar: np.ndarray
    C: np.ndarray
    D: np.ndarray
    clip: np.floating | None
    state: tuple[FrozenQuant, FrozenQuant] | None

    def __post_init__(self) -> None:
        for name in ("Abar", "Bbar", "C", "D"):
            value = getattr(self, name).copy()
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        # Abar, Bbar, C as (M, 1, H), complex and as real / imaginary planes
        modes = [np.ascontiguousarray(z.T[:, None, :]) for z in (self.Abar, self.Bbar, self.C)]
        planes = [np.ascontiguousarray(part) for z in modes for part in (z.real, z.imag)]
        for a in modes + planes:
            a.setflags(write=False)
        object.__setattr__(self, "_modes", tuple(modes))
        object.__setattr__(self, "_planes", tuple(planes))

    def step(self, u_t: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(y_t (batch, H), new state (M, batch, H)) of one step; see the class docstring."""
        if self.clip is None:
            A, B, C = self._modes
            x = A * state
            x += B * u_t
            y = 2 * (C * x).real.sum(axis=0) + self.D * u_t
            return y, x
        ar, ai, br, bi, cr, ci = self._planes
        xr, xi = state.real.copy(), state.imag.copy()
        tmp = np.empty_like(xr)
        vr = np.multiply(ar, xr)  # vr = (ar*xr - ai*xi) + br*u
        vr -= np.multiply(ai, xi, out=tmp)
        vr += np.multiply(br, u_t, out=tmp)
        vi = np.multiply(ar, xi, out=xi)  # vi = (ar*xi + ai*xr) + bi*u; x_{t-1}'s imaginary part is done
        vi += np.multiply(ai, xr, out=tmp)
        vi += np.multiply(bi, u_t, out=tmp)
        for i, v in enumerate((vr, vi)):
            if np.isfinite(self.clip):
                np.clip(v, -self.clip, self.clip, out=v)
            if self.state is not None:
                self.state[i].apply(v)
        terms = np.multiply(cr, vr, out=tmp)
        terms -= np.multiply(ci, vi, out=xr)  # x_{t-1}'s real part is done too
        terms = terms.astype(np.float64)  # exact; the kernel adds each float32 term to a float64 acc
        if terms[0].size > 1:
            # the modes axis is not the fast one in memory, so numpy adds the (batch, H) rows one by
            # one in order 0..M-1 (pairwise summation only runs along the fast axis: np.sum's notes)
            acc = np.add.reduce(terms, axis=0)
        else:
            acc = terms[0].copy()
            for n in range(1, terms.shape[0]):
                acc += terms[n]
        y = (2.0 * acc + self.D * u_t).astype(self.D.dtype)
        x = np.empty(state.shape, dtype=state.dtype)
        x.real, x.imag = vr, vi
        return y, x
