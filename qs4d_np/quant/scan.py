"""Checked entry points of the quantized-state recurrent scan (``kernels.quant_scan``).

``StateQuant`` describes the state quantizer: a symmetric ``QuantSpec`` (its
grid gives qmin/qmax, its rounding rule the mode) and a fixed ``inv`` (codes
per unit, e.g. from calibration): a scalar (per tensor), (H,) (per channel,
shared by the real and imaginary parts) or (H, 2) (per channel and part).
``spec=None`` disables quantization (the state is only clipped). An
``observer`` (optional) is called once after each forward with the (H, 2)
float64 max |w| per channel and part, w the clipped pre-quantization values
(the values the state quantizer sees), from the forward's own states: a
running range can follow the quantized scan without a second (float) pass.

    y, cache = quant_scan(u, Abar, Bbar, C, D, state, clip)
    grads    = quant_scan_backward(gy, cache)   # du, Abar, Bbar, C, D, step
    absmax   = state_absmax(u, Abar, Bbar, StateQuant(None), clip)   # calibration, (H, 2)
    state    = StateQuant.calibrated(spec, absmax, "channel")

Abar, Bbar, C are (H, M) complex, already quantized by the caller, whose
straight-through backward takes the gradients returned here. Complex
gradients follow dL/dRe + i*dL/dIm. ``grads['step']`` is dL/d(1/inv), shaped
like the ``inv`` given (zeros when quantization is off).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from qs4d_np.core.checks import check_array, check_choice, check_float, check_grad_like, check_sequence_input
from qs4d_np.kernels import quant_scan as kern
from qs4d_np.quant.fake import STE_MODES, QuantSpec
from qs4d_np.quant.grids import ROUNDING


@dataclass(frozen=True)
class StateQuant:
    """State quantizer of the recurrent scan: spec (None = off), inv, STE rule, observer (module docstring)."""

    spec: QuantSpec | None
    inv: float | np.ndarray = 1.0
    ste: str = "identity"
    observer: Callable[[np.ndarray], None] | None = None

    def __post_init__(self) -> None:
        check_choice("ste", self.ste, STE_MODES)
        if self.spec is not None:
            if not self.spec.symmetric:
                raise ValueError("the state quantizer must be symmetric (zero point 0)")
            inv = np.asarray(self.inv, dtype=np.float64)
            if not (np.isfinite(inv).all() and (inv > 0).all()):
                raise ValueError(f"inv (state codes per unit) must be finite and > 0, got {self.inv!r}")

    def per_channel_inv(self, H: int, dtype: np.dtype) -> np.ndarray:
        """inv as (H, 2) in ``dtype`` (ones when quantization is off)."""
        if self.spec is None:
            return np.ones((H, 2), dtype=dtype)
        inv = np.asarray(self.inv, dtype=np.float64)
        if inv.shape == ():
            out = np.full((H, 2), float(inv))
        elif inv.shape == (H,):
            out = np.repeat(inv[:, None], 2, axis=1)
        elif inv.shape == (H, 2):
            out = inv.copy()
        else:
            raise ValueError(f"inv must be a scalar, shape ({H},) or ({H}, 2), got shape {inv.shape}")
        return out.astype(dtype)

    @classmethod
    def calibrated(cls, spec: QuantSpec, absmax: np.ndarray, granularity: str = "channel",
                   ste: str = "identity") -> "StateQuant":
        """A state quantizer whose range is ``absmax`` ((H, 2), e.g. from ``state_absmax``).

        granularity: ``tensor`` (one inv), ``channel`` (per channel, shared by the parts),
        ``part`` (per channel and part). inv = qpos / range as ``QuantSpec.scales`` computes
        it (floored at min_range, rounded down to a power of two when spec.power_of_two).
        """
        check_choice("granularity", granularity, ("tensor", "channel", "part"))
        absmax = check_array("absmax", absmax, ndim=2, shape=(None, 2))
        r = {"tensor": absmax.max(keepdims=True).reshape(()), "channel": absmax.max(axis=1),
             "part": absmax}[granularity]
        r = np.asarray(r, dtype=np.float64)
        inv, _ = spec.scales(-r.reshape(-1), r.reshape(-1), np.dtype(np.float64))
        return cls(spec, inv.reshape(r.shape) if r.shape else float(inv[0]), ste)

    def reduce_step(self, dstep: np.ndarray) -> np.ndarray:
        """(H, 2) step gradient -> the shape of ``inv``."""
        shape = np.shape(self.inv)
        if shape == ():
            return np.asarray(dstep.sum())
        return dstep.sum(axis=1) if len(shape) == 1 else dstep


@dataclass
class ScanCache:
    u: np.ndarray
    planes: tuple[np.ndarray, ...]
    D: np.ndarray
    inv: np.ndarray
    state: StateQuant
    clip: float


def _planes(name: str, z: np.ndarray, H: int, M: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    z = check_array(name, z, shape=(H, M), allow_complex=True)
    return np.ascontiguousarray(z.real, dtype=dtype), np.ascontiguousarray(z.imag, dtype=dtype)


def _kernel_args(cache: ScanCache) -> tuple:
    dtype = cache.u.dtype
    st = cache.state
    if st.spec is None:
        qmin, qmax, mode = dtype.type(-1.0), dtype.type(1.0), 0
    else:
        g = st.spec.code_grid
        (qmin, qmax), mode = g.bounds(dtype), ROUNDING[st.spec.rounding]
    return (cache.u, *cache.planes, cache.D, cache.inv, qmin, qmax, mode,
            dtype.type(cache.clip), st.spec is not None)


def quant_scan(u: np.ndarray, Abar: np.ndarray, Bbar: np.ndarray, C: np.ndarray, D: np.ndarray,
               state: StateQuant, clip: float = np.inf) -> tuple[np.ndarray, ScanCache]:
    """y (B, L, H) of the quantized-state scan; u float32/float64 sets the dtype."""
    cache = _checked(u, Abar, Bbar, C, D, state, clip)
    y = np.empty_like(cache.u)
    B, _, H = cache.u.shape
    wmax = np.empty((B * H if state.observer is not None else 0, 2))
    kern.quant_scan_forward(*_kernel_args(cache), y, wmax)
    if state.observer is not None:
        state.observer(wmax.reshape(B, H, 2).max(axis=0))  # a max is exact: any order gives the same
    return y, cache


def _checked(u, Abar, Bbar, C, D, state, clip) -> ScanCache:
    """Validate the arguments and convert them to the kernels' planes and dtype."""
    if not isinstance(state, StateQuant):
        raise TypeError(f"state must be a StateQuant, got {type(state).__name__}")
    Abar = check_array("Abar", Abar, ndim=2, allow_complex=True)
    H, M = Abar.shape
    u = check_sequence_input("u", u, H)
    if u.dtype not in (np.float32, np.float64):
        raise TypeError(f"u must be float32 or float64, got {u.dtype}")
    dtype = u.dtype
    if not (isinstance(clip, (float, np.floating)) and clip == np.inf):  # inf = no clip
        clip = check_float("clip", clip, min_value=0.0, min_inclusive=False)
    D = np.ascontiguousarray(check_array("D", D, shape=(H,)), dtype=dtype)
    planes = (*_planes("Abar", Abar, H, M, dtype), *_planes("Bbar", Bbar, H, M, dtype),
              *_planes("C", C, H, M, dtype))
    return ScanCache(np.ascontiguousarray(u), planes, D, state.per_channel_inv(H, dtype), state, clip)


def state_absmax(u: np.ndarray, Abar: np.ndarray, Bbar: np.ndarray, state: StateQuant,
                 clip: float = np.inf) -> np.ndarray:
    """max |Re x| and max |Im x| per channel, (H, 2) float64, over the scan's states.

    Use ``StateQuant(None)`` to calibrate from float states, then ``StateQuant.calibrated``.
    """
    H, M = check_array("Abar", Abar, ndim=2, allow_complex=True).shape
    cache = _checked(u, Abar, Bbar, np.zeros((H, M)), np.zeros(H), state, clip)  # C, D unused
    args = _kernel_args(cache)
    return kern.quant_scan_state_absmax(args[0], *args[1:5], *args[8:14])


def quant_scan_backward(gy: np.ndarray, cache: ScanCache) -> dict[str, np.ndarray]:
    """Gradients of the scan: du (B, L, H) and Abar, Bbar, C (H, M) complex, D (H,), step."""
    gy = check_grad_like("gy", gy, cache.u.shape)
    gy = np.ascontiguousarray(gy, dtype=cache.u.dtype)
    du = np.empty_like(cache.u)
    dAr, dAi, dBr, dBi, dCr, dCi, dD, dstep = kern.quant_scan_backward(
        *_kernel_args(cache), cache.state.ste == "clipped", gy, du)
    cdt = np.result_type(cache.u.dtype, np.complex64)
    return {"u": du, "Abar": (dAr + 1j * dAi).astype(cdt), "Bbar": (dBr + 1j * dBi).astype(cdt),
            "C": (dCr + 1j * dCi).astype(cdt), "D": dD.astype(cache.u.dtype),
            "step": cache.state.reduce_step(dstep)}
