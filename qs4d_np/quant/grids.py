"""Integer grids for n quantization states, and the names of the rounding rules.

A target gets a number of quantization states n (``levels``), not bits, as in
QS4D; any integer n >= 2 is allowed. A grid turns n into the integer code
range [qmin, qmax] and the code ``qpos`` that the top of the range (absmax,
a fixed range, ...) maps to in symmetric mode:

=========  ==========================  ==============  ===========================
grid       codes (symmetric)           qpos            notes
=========  ==========================  ==============  ===========================
narrow     -m..m, m = (n-1)//2         m               ours, the default: at most n
                                                       levels, symmetric, n = 2**b
                                                       fits a b-bit word
qs4d       floor(-n/2)..floor(n/2)     n/2 (a float)   the reference: n+1 levels for
                                                       even n, one more than b bits
                                                       hold; lopsided for odd n
full       -(n//2)..n-1-(n//2)         n//2            two's complement, n levels;
                                                       +absmax clips one step short
=========  ==========================  ==============  ===========================

Asymmetric quantization maps [lo, hi] onto all the grid's codes with a zero
point; the narrow grid then uses the full grid's n codes (its restriction
only exists to keep the symmetric grid symmetric).

``bits`` is the width of the smallest two's-complement word holding every
code of the grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qs4d_np.core.checks import check_choice, check_int

GRIDS = ("narrow", "qs4d", "full")

# Rounding rule names (SPEC.md section 5) -> kernel mode codes.
ROUNDING = {
    "half_even": 0,   # ties to even: np.rint, AP_RND_CONV
    "half_up": 1,     # ties toward +inf: floor(x + 1/2), AP_RND
    "half_away": 2,   # ties away from zero: gemmlowp, QONNX HALF_UP
    "floor": 3,       # truncation toward -inf: arithmetic right shift, AP_TRN
}

# Largest level count: codes must stay exact integers in float64.
MAX_LEVELS = 2**52


def check_levels(levels: object, name: str = "levels") -> int:
    """``levels`` as an int in [2, 2**52]; a clear error otherwise."""
    return check_int(name, levels, min_value=2, max_value=MAX_LEVELS)


@dataclass(frozen=True)
class Grid:
    """The integer code range of ``levels`` states on grid ``name``."""

    name: str
    levels: int
    symmetric: bool
    qmin: int
    qmax: int
    qpos: float

    @property
    def n_codes(self) -> int:
        return self.qmax - self.qmin + 1

    @property
    def bits(self) -> int:
        """Width of the smallest two's-complement word holding [qmin, qmax]."""
        b = 1
        while not (-(2 ** (b - 1)) <= self.qmin and self.qmax <= 2 ** (b - 1) - 1):
            b += 1
        return b

    def bounds(self, dtype: np.dtype) -> tuple[np.floating, np.floating]:
        """(qmin, qmax) as scalars of the float ``dtype`` the kernels clamp codes with.

        Past the dtype's exact-integer range (2**24 for float32, 2**53 for
        float64) ``dtype.type(qmax)`` can round outward (float32(2**31 - 1) is
        2**31), so clamped codes would leave the grid and its ``bits``-wide
        word. Each bound is therefore stepped to the nearest float at or inside
        [qmin, qmax]. We clamp rather than reject such level counts: a float32
        tensor with that many levels is quantized finer than float32 resolves,
        which is a legitimate near-lossless sweep point, and the check is two
        scalar comparisons per call, nothing on the per-element path.
        """
        real = np.dtype(dtype).type
        lo, hi = real(self.qmin), real(self.qmax)
        if int(hi) > self.qmax:
            hi = np.nextafter(hi, real(0))
        if int(lo) < self.qmin:
            lo = np.nextafter(lo, real(0))
        return lo, hi


def make_grid(name: str, levels: int, symmetric: bool = True) -> Grid:
    """The code range of ``levels`` states on grid ``name`` (see the module table)."""
    check_choice("grid", name, GRIDS)
    n = check_levels(levels)
    if name == "qs4d":
        return Grid(name, n, symmetric, -((n + 1) // 2), n // 2, n / 2)
    if name == "narrow" and symmetric:
        m = (n - 1) // 2
        if m == 0:
            raise ValueError("levels=2 on the symmetric narrow grid leaves only the code 0; "
                             "use levels >= 3 (3 = ternary), grid='qs4d' or symmetric=False")
        return Grid(name, n, symmetric, -m, m, float(m))
    return Grid(name, n, symmetric, -(n // 2), n - 1 - n // 2, float(n // 2))
