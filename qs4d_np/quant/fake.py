"""Functional fake quantization: quantize then dequantize, and its STE backward.

For each channel (or the whole tensor) the quantizer picks ``inv`` (codes per
unit, the reciprocal of the step) and an integer zero point ``zp``, then

    q     = clamp(round(x * inv) + zp, qmin, qmax)        (saturate, never wrap)
    x_hat = (q - zp) / inv

with the rounding rule named by ``rounding`` and [qmin, qmax] from the grid
(``qs4d_np.quant.grids``). In symmetric mode zp = 0 and inv = qpos / r for a
range r; asymmetric mode maps [lo, hi] (stretched to contain 0, so 0 stays
exact) onto [qmin, qmax]: inv = (qmax - qmin) / (hi - lo),
zp = qmin - round_half_even(lo * inv). Ranges are floored at ``min_range``
(1e-5, as the reference) before dividing. ``power_of_two`` rounds inv down to
a power of two (the step up), so shifts suffice in hardware and the range is
never cut.

Where the range comes from (``scale_mode``):

* ``absmax``: max|x| per call (the reference; for activations it depends on the batch);
* ``absmean``: r = 2 * mean|x| * sqrt(qpos), i.e. the LSQ initial step 2*mean|x|/sqrt(qpos) (symmetric only);
* ``fixed``: ``fixed_range`` r (symmetric) or (lo, hi) (asymmetric), a float or one value per channel.

Learned (LSQ) and calibrated running ranges keep state and live in
``qs4d_np.quant.quantizer.Quantizer``, which calls ``QuantSpec.apply`` with
its own ranges.

Complex tensors: ``complex_mode="cartesian"`` quantizes the real and the
imaginary parts with separate scales, ``"shared"`` with one scale from both
parts (the reference's C). Per-channel scales (``axis``) are per channel and
per part.

Modulus bound (``max_modulus``, complex tensors only): each value's code pair
is kept where it dequantizes inside the disk |z| <= max_modulus, else moved
to the nearest admissible neighbour on the grid (``QuantSpec``); e.g. a
discrete state matrix Abar stays stable (|Abar_q| <= 1) at few bits.

Shapes: ``x`` any shape; per-channel scales have the channel count at
``axis`` and 1 elsewhere; complex codes are stacked (real, imag) in a new
leading axis of size 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qs4d_np.core.checks import check_array, check_bool, check_choice, check_float, check_int
from qs4d_np.kernels import fake_quant as kern
from qs4d_np.quant.grids import GRIDS, ROUNDING, Grid, make_grid

SCALE_MODES = ("absmax", "absmean", "fixed")
COMPLEX_MODES = ("cartesian", "shared")
STE_MODES = ("identity", "clipped")


@dataclass(frozen=True)
class Layout:
    """How a tensor is seen by the kernels: flat (G, P, C, Q), see ``kernels.fake_quant``."""

    shape: tuple[int, ...]
    dtype: np.dtype
    axis: int | None
    G: int
    P: int
    C: int
    Q: int

    @property
    def is_complex(self) -> bool:
        return self.dtype.kind == "c"

    @property
    def channels(self) -> int:
        return self.G * self.C

    @property
    def per_channel_count(self) -> int:
        """Real entries sharing one scale."""
        return (2 if self.is_complex else 1) * int(np.prod(self.shape, dtype=np.int64)) // self.channels

    def flatten(self, x: np.ndarray) -> np.ndarray:
        """x (shape) -> flat real contiguous array in this layout (a view when possible)."""
        if self.is_complex:
            return np.stack([x.real, x.imag]).reshape(-1)
        return np.ascontiguousarray(x).reshape(-1)

    def restore(self, flat: np.ndarray) -> np.ndarray:
        """Inverse of ``flatten``: back to ``shape`` (and complex)."""
        if self.is_complex:
            parts = flat.reshape((2,) + self.shape)
            out = np.empty(self.shape, dtype=self.dtype)
            out.real, out.imag = parts[0], parts[1]
            return out
        return flat.reshape(self.shape)

    def broadcast(self, per_channel: np.ndarray) -> np.ndarray:
        """(G*C,) -> shape broadcastable to the codes (leading 2-axis for complex)."""
        shape = [1] * len(self.shape)
        if self.axis is not None:
            shape[self.axis] = self.C
        if self.is_complex:
            shape = [self.G] + shape
        return per_channel.reshape(shape)


def make_layout(x: np.ndarray, axis: int | None, complex_mode: str) -> Layout:
    shape = tuple(x.shape)
    if axis is None:
        P, C, Q = 1, 1, int(np.prod(shape, dtype=np.int64))
    else:
        P = int(np.prod(shape[:axis], dtype=np.int64))
        C = shape[axis]
        Q = int(np.prod(shape[axis + 1:], dtype=np.int64))
    G = 1
    if x.dtype.kind == "c":
        if complex_mode == "cartesian":
            G = 2
        else:
            P *= 2
    return Layout(shape, x.dtype, axis, G, P, C, Q)


@dataclass(frozen=True)
class QuantTensor:
    """Integer codes and the scales that reproduce a fake-quantized tensor.

    q: int64 codes, x's shape (complex: (2,) + shape, real then imaginary part).
    inv_scale: codes per unit (float64, broadcastable to q), exactly the value
    the forward multiplied by; zero_point: int64, broadcastable to q.
    ``dequantize()`` = (q - zero_point) / inv_scale in x's dtype, bit for bit
    the fake-quant output.
    """

    q: np.ndarray
    inv_scale: np.ndarray
    zero_point: np.ndarray
    grid: Grid
    dtype: np.dtype

    @property
    def scale(self) -> np.ndarray:
        """The step (units per code), 1/inv_scale; exact when scales are powers of two."""
        return 1.0 / self.inv_scale

    def dequantize(self) -> np.ndarray:
        real = np.dtype(self.dtype).type(0).real.dtype
        inv = self.inv_scale.astype(real)
        out = ((self.q - self.zero_point).astype(real) / inv).astype(real)
        if np.dtype(self.dtype).kind == "c":
            return (out[0] + 1j * out[1]).astype(self.dtype)
        return out


@dataclass
class QuantState:
    """What one forward used: layout, per-channel inv and zp (flat, x's real dtype)."""

    layout: Layout
    inv: np.ndarray
    zp: np.ndarray
    grid: Grid
    mode: int
    codes: np.ndarray | None = field(default=None, repr=False)

    def tensor(self) -> QuantTensor:
        if self.codes is None:
            raise RuntimeError("codes were not kept; call apply(..., want_codes=True)")
        lay = self.layout
        q = self.codes.astype(np.int64)
        q = q.reshape((2,) + lay.shape) if lay.is_complex else q.reshape(lay.shape)
        return QuantTensor(q, lay.broadcast(self.inv.astype(np.float64)),
                           lay.broadcast(self.zp.astype(np.int64)), self.grid, lay.dtype)


@dataclass(frozen=True)
class QuantSpec:
    """Every option of a fake quantizer except where the range comes from at run time.

    levels: quantization states n >= 2; grid: one of ``GRIDS``; axis: None
    (per tensor) or the channel axis; rounding: a name in ``ROUNDING``;
    complex_mode: ``COMPLEX_MODES``; min_range: floor of the range (> 0).

    max_modulus: None (the default: each part rounded on its own) or a bound m > 0 on
    the modulus of complex values (real tensors are refused). Scales are computed as
    without it; each value x = a + ib then gets codes (q_re, q_im) as follows:

    * round both parts as usual; keep the codes when they are admissible, i.e.
      ((q_re - zp_re)/inv_re)^2 + ((q_im - zp_im)/inv_im)^2 <= m^2, evaluated in
      float64 on the codes in this order (the dequantized values of x's dtype may
      differ from those quotients by half an ulp of that dtype);
    * otherwise, if |x| > m, project x radially onto the circle of radius m first;
      then take the admissible corner of the grid cell around x*inv (floor / ceil
      of each part, saturated to [qmin, qmax] like every code) nearest to x in
      value space; ties go to the earlier corner in the order (zero-ward re,
      zero-ward im), (zero-ward, outward), (outward, zero-ward), (outward, outward).
      The all-zero-ward corner is admissible in exact arithmetic; should x's
      float rounding put it a hair outside, the part of larger magnitude steps one
      code toward zero until the pair is admissible.

    This biases the rounding toward the disk, only on the values whose plain
    rounding leaves it. The backward is unchanged for the identity STE; the
    clipped STE still zeroes where a part's plain rounding saturates; the LSQ step
    gradient uses the codes actually chosen (``ste_backward``).
    """

    levels: int
    grid: str = "narrow"
    symmetric: bool = True
    axis: int | None = None
    rounding: str = "half_even"
    power_of_two: bool = False
    complex_mode: str = "cartesian"
    min_range: float = 1e-5
    max_modulus: float | None = None

    def __post_init__(self) -> None:
        check_choice("grid", self.grid, GRIDS)
        check_bool("symmetric", self.symmetric)
        check_choice("rounding", self.rounding, tuple(ROUNDING))
        check_bool("power_of_two", self.power_of_two)
        check_choice("complex_mode", self.complex_mode, COMPLEX_MODES)
        check_float("min_range", self.min_range, min_value=0.0, min_inclusive=False)
        if self.axis is not None:
            check_int("axis", self.axis)
        if self.max_modulus is not None:
            object.__setattr__(self, "max_modulus",
                               check_float("max_modulus", self.max_modulus, min_value=0.0, min_inclusive=False))
        object.__setattr__(self, "_grid", make_grid(self.grid, self.levels, self.symmetric))

    @property
    def code_grid(self) -> Grid:
        """The integer code range (qmin, qmax, qpos, bits)."""
        return self._grid  # type: ignore[attr-defined]

    @property
    def bits(self) -> int:
        return self.code_grid.bits

    # -- layout -------------------------------------------------------------
    def layout(self, x: np.ndarray, name: str = "x") -> Layout:
        """Check ``x`` (float or complex, no NaN check here: the kernels count them)."""
        x = check_array(name, x, finite=False, allow_complex=True)
        if x.dtype.kind not in ("f", "c") or x.dtype.itemsize < (8 if x.dtype.kind == "c" else 4):
            raise TypeError(f"{name} must be float32/float64/complex64/complex128, got dtype {x.dtype}")
        if x.size == 0:
            raise ValueError(f"{name} must not be empty, got shape {x.shape}")
        axis = self.axis
        if axis is not None:
            if not -x.ndim <= axis < x.ndim:
                raise ValueError(f"axis={axis} does not exist for {name} with shape {x.shape} "
                                 f"(expected -{x.ndim} <= axis < {x.ndim})")
            axis %= x.ndim
        lay = make_layout(x, axis, self.complex_mode)
        self._check_bound(lay, name)
        return lay

    def _check_bound(self, lay: Layout, name: str) -> None:
        if self.max_modulus is not None and not lay.is_complex:
            raise ValueError(f"max_modulus={self.max_modulus} bounds complex values, but {name} is real "
                             f"(dtype {lay.dtype}); use max_modulus=None for real tensors")

    # -- ranges -> (inv, zp) -----------------------------------------------
    def stats_range(self, xf: np.ndarray, lay: Layout, scale_mode: str,
                    name: str = "x") -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) per channel (float64, (G*C,)) from the data; raises on NaN/inf."""
        mins, maxs, sums, bad = kern.tensor_stats(xf, lay.G, lay.P, lay.C, lay.Q, scale_mode == "absmean")
        if bad:
            raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf); cannot quantize")
        if scale_mode == "absmax":
            if self.symmetric:
                r = np.maximum(np.abs(mins), np.abs(maxs))
                return -r, r
            return mins, maxs
        if scale_mode == "absmean":
            if not self.symmetric:
                raise ValueError("scale_mode='absmean' needs symmetric=True")
            r = 2.0 * sums / lay.per_channel_count * np.sqrt(self.code_grid.qpos)
            return -r, r
        raise ValueError(f"scale_mode must be one of ['absmax', 'absmean'] here, got {scale_mode!r}")

    def fixed_range(self, fixed_range: object, lay: Layout) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) per channel from a user range: r (symmetric) or (lo, hi) (asymmetric)."""
        if fixed_range is None:
            raise ValueError("scale_mode='fixed' needs fixed_range (r, or (lo, hi) when symmetric=False)")

        def per_channel(v: object, what: str) -> np.ndarray:
            arr = np.asarray(v, dtype=np.float64)
            if arr.ndim == 0:
                arr = np.full(lay.channels, float(arr))
            if arr.shape != (lay.channels,) or not np.isfinite(arr).all():
                raise ValueError(f"fixed_range {what} must be a finite float or {lay.channels} values "
                                 f"(one per channel{' and part' if lay.G == 2 else ''}), got {v!r}")
            return arr

        if self.symmetric:
            r = per_channel(fixed_range, "r")
            if (r <= 0).any():
                raise ValueError(f"fixed_range must be > 0, got {fixed_range!r}")
            return -r, r
        if not (isinstance(fixed_range, (tuple, list)) and len(fixed_range) == 2):
            raise ValueError(f"fixed_range must be a pair (lo, hi) when symmetric=False, got {fixed_range!r}")
        lo, hi = per_channel(fixed_range[0], "lo"), per_channel(fixed_range[1], "hi")
        if (lo > hi).any():
            raise ValueError(f"fixed_range needs lo <= hi, got {fixed_range!r}")
        return lo, hi

    def scales(self, lo: np.ndarray, hi: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(inv, zp) per channel in ``dtype`` from ranges [lo, hi].

        The floor and the range are taken in ``dtype`` and the quotient in
        float64 before the cast: float64 division rounded to float32 equals
        float32 division, so a float32 tensor gets the reference's float32 scale.
        """
        g = self.code_grid
        floor = dtype.type(self.min_range)
        if self.symmetric:
            r = np.maximum(np.maximum(np.abs(lo), np.abs(hi)).astype(dtype), floor)
            inv = g.qpos / r.astype(np.float64)
        else:
            lo = np.minimum(lo, 0.0).astype(dtype).astype(np.float64)
            hi = np.maximum(hi, 0.0).astype(dtype).astype(np.float64)
            span = np.maximum((hi - lo).astype(dtype), floor).astype(np.float64)
            inv = (g.qmax - g.qmin) / span
        inv = inv.astype(dtype)
        if self.power_of_two:
            expo = np.frexp(inv)[1]  # inv = mant * 2**expo, mant in [0.5, 1)
            inv = np.ldexp(np.ones_like(inv), expo - 1)
        if self.symmetric:
            zp = np.zeros_like(inv)
        else:
            zp = (g.qmin - np.rint(lo.astype(dtype) * inv)).astype(dtype)
        return inv, zp

    # -- the pass ----------------------------------------------------------
    def apply(self, x: np.ndarray, lay: Layout, inv: np.ndarray, zp: np.ndarray, *,
              want_codes: bool = False, name: str = "x") -> tuple[np.ndarray, QuantState]:
        """Fake-quantize ``x`` with per-channel (inv, zp); returns (x_hat, state for backward).

        With ``max_modulus`` the state always keeps the codes: the backward needs the chosen ones."""
        self._check_bound(lay, name)
        xf = lay.flatten(x)
        real = xf.dtype
        out = np.empty_like(xf)
        keep = want_codes or self.max_modulus is not None
        codes = np.empty_like(xf) if keep else np.empty(0, dtype=real)
        g = self.code_grid
        inv, zp = inv.astype(real), zp.astype(real)
        bad = kern.fake_quant_forward(xf, inv, zp, *g.bounds(real), ROUNDING[self.rounding],
                                      lay.G, lay.P, lay.C, lay.Q, out, codes, keep)
        if bad:
            raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf); cannot quantize")
        if self.max_modulus is not None:
            kern.disk_bound(xf, inv, zp, *g.bounds(real), lay.G, lay.P, lay.C, lay.Q,
                            self.max_modulus, out, codes)
        state = QuantState(lay, inv, zp, g, ROUNDING[self.rounding], codes if keep else None)
        return lay.restore(out), state

    def forward(self, x: np.ndarray, *, scale_mode: str = "absmax", fixed_range: object = None,
                want_codes: bool = False, name: str = "x") -> tuple[np.ndarray, QuantState]:
        """Ranges from ``scale_mode`` (``SCALE_MODES``), then ``apply``."""
        check_choice("scale_mode", scale_mode, SCALE_MODES)
        lay = self.layout(x, name)
        real = np.dtype(lay.dtype.type(0).real.dtype)
        if scale_mode == "fixed":
            lo, hi = self.fixed_range(fixed_range, lay)
        else:
            if fixed_range is not None:
                raise ValueError(f"fixed_range is only used with scale_mode='fixed', got scale_mode={scale_mode!r}")
            lo, hi = self.stats_range(lay.flatten(x), lay, scale_mode, name)
        inv, zp = self.scales(lo, hi, real)
        return self.apply(x, lay, inv, zp, want_codes=want_codes, name=name)


def ste_backward(grad: np.ndarray, x: np.ndarray, state: QuantState, ste: str = "identity",
                 want_step: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """dL/dx through the straight-through estimator, and optionally dL/dstep per channel.

    ``identity`` passes ``grad`` unchanged (the reference); ``clipped`` zeroes
    it where the code saturated (round(x*inv) + zp outside [qmin, qmax]). ``want_step`` (LSQ) adds the
    per-channel (G*C,) float64 gradient w.r.t. the step 1/inv (see
    ``kernels.fake_quant.ste_backward``), from the forward's codes when the state kept them.
    """
    check_choice("ste", ste, STE_MODES)
    lay = state.layout
    grad = check_array("grad", grad, shape=lay.shape, allow_complex=lay.is_complex)
    # x goes to the kernel with the saved layout's sizes: a mismatch would read out of bounds.
    x = np.asarray(x)
    if x.shape != lay.shape or x.dtype != lay.dtype:
        raise ValueError(f"x must be the tensor the forward quantized, shape {lay.shape} dtype {lay.dtype}; "
                         f"got shape {x.shape} dtype {x.dtype}")
    if ste == "identity" and not want_step:
        return grad, None
    xf, gf = lay.flatten(x), lay.flatten(grad.astype(lay.dtype, copy=False))
    dxf = np.empty_like(xf)
    real = xf.dtype
    g = state.grid
    codes = state.codes if state.codes is not None else np.empty(0, dtype=real)
    dstep = kern.ste_backward(xf, gf, state.inv, state.zp, *g.bounds(real), state.mode,
                              lay.G, lay.P, lay.C, lay.Q, want_step, dxf, codes)
    dx = grad if ste == "identity" else lay.restore(dxf)
    return dx, (dstep if want_step else None)


def _spec(levels: int, options: dict) -> tuple[QuantSpec, str, object]:
    scale_mode = options.pop("scale_mode", "absmax")
    fixed_range = options.pop("fixed_range", None)
    allowed = set(QuantSpec.__dataclass_fields__) - {"levels"}
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"unknown fake_quant option(s) {sorted(unknown)}; expected some of "
                        f"{sorted(allowed | {'scale_mode', 'fixed_range'})}")
    return QuantSpec(levels, **options), scale_mode, fixed_range


def fake_quant(x: np.ndarray, levels: int, **options: object) -> np.ndarray:
    """Quantize-dequantize ``x`` to ``levels`` states; options as ``QuantSpec`` plus
    ``scale_mode`` ('absmax', 'absmean', 'fixed') and ``fixed_range``. Same shape and dtype as x."""
    spec, scale_mode, fixed_range = _spec(levels, dict(options))
    return spec.forward(x, scale_mode=scale_mode, fixed_range=fixed_range)[0]


def quantize(x: np.ndarray, levels: int, **options: object) -> QuantTensor:
    """Like ``fake_quant`` but returns the integer codes, scales and zero points."""
    spec, scale_mode, fixed_range = _spec(levels, dict(options))
    return spec.forward(x, scale_mode=scale_mode, fixed_range=fixed_range, want_codes=True)[1].tensor()
