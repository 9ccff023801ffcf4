"""Integer primitives of the golden model (docs/integer_spec.md, section 2).

Everything here is integer-only: int64 NumPy arrays in, int64 arrays out. The
one rounding rule is round-half-to-even (RNE) applied once, by an arithmetic
right shift of an exact integer sum (``rne_shift``, the only implementation:
NumPy callers and the Numba kernel of ``golden.fast`` both run it); saturation clamps (never wraps) to a
tensor's grid and reports which words were clamped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numba import njit, vectorize

from qs4d_np.core.checks import check_int
from qs4d_np.quant.grids import Grid, make_grid

# |accumulator| must stay below this so that int64 never overflows.
INT64_BOUND = 1 << 63
MAX_SHIFT = 62
# Multipliers are non-negative 64-bit two's-complement words, so at most 2**63 - 1.
MULT_LIMIT = 1 << 63


def word_range(width: int, signed: bool = True) -> tuple[int, int]:
    """The integers a ``width``-bit word holds (two's complement if ``signed``)."""
    width = check_int("width", width, min_value=1, max_value=64)
    return (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)


def bits_needed(qmin: int, qmax: int) -> int:
    """Smallest two's-complement width holding every integer in [qmin, qmax] (``Grid.bits``)."""
    # qpos is unused by ``bits``; an int keeps this module free of floats (int is a valid float hint)
    return Grid(name="range", levels=qmax - qmin + 1, symmetric=True, qmin=qmin, qmax=qmax, qpos=qmax).bits


def check_in_range(name: str, q: np.ndarray, lo: int, hi: int, what: str = "its grid") -> np.ndarray:
    """Require an integer array with every value in [lo, hi]; return it as int64.

    The range is checked on the original values, before the int64 cast, so a
    huge uint64 cannot wrap into range; the comparison uses Python ints, so
    bounds up to 2**64 - 1 are exact (NumPy compares arrays with out-of-range
    Python ints exactly too). An unsigned value >= 2**63 (allowed only
    when ``hi`` says so) comes back as its two's-complement int64 bit pattern.
    """
    if not isinstance(q, np.ndarray) or q.dtype.kind not in ("i", "u"):
        got = q.dtype if isinstance(q, np.ndarray) else type(q).__name__
        raise TypeError(f"{name} must be an integer numpy array, got {got}")
    if q.size and (int(q.min()) < lo or int(q.max()) > hi):
        bad = np.flatnonzero((q < lo) | (q > hi))
        first = int(bad[0])
        raise ValueError(f"{name} has {bad.size} value(s) outside {what} [{lo}, {hi}] (first: flat "
                         f"index {first} = {int(q.flat[first])}; range seen [{int(q.min())}, {int(q.max())}])")
    return q.astype(np.int64, copy=False)


@dataclass(frozen=True)
class IntFormat:
    """A signed integer tensor: ``width``-bit words restricted to the grid [qmin, qmax].

    The grid may be narrower than the word (the QS4D grid with n = 2**b
    states is [-2**(b-1), 2**(b-1)], which needs b + 1 bits).
    """

    width: int
    qmin: int
    qmax: int

    def __post_init__(self) -> None:
        check_int("width", self.width, min_value=2, max_value=32)
        check_int("qmin", self.qmin)
        check_int("qmax", self.qmax)
        if self.qmin > self.qmax:
            raise ValueError(f"grid must have qmin <= qmax, got [{self.qmin}, {self.qmax}]")
        lo, hi = word_range(self.width)
        if self.qmin < lo or self.qmax > hi:
            need = bits_needed(self.qmin, self.qmax)
            raise ValueError(
                f"grid [{self.qmin}, {self.qmax}] needs {need} bits, but width {self.width} "
                f"holds only [{lo}, {hi}]; use width >= {need} or a narrower grid")

    @classmethod
    def full(cls, width: int) -> "IntFormat":
        """Every value of a ``width``-bit two's-complement word."""
        lo, hi = word_range(width)
        return cls(width, lo, hi)

    @classmethod
    def qs4d(cls, levels: int, width: int | None = None) -> "IntFormat":
        """The QS4D absmax grid with ``levels`` states (``make_grid("qs4d", levels)``).

        ``width`` defaults to the smallest that holds the grid; an explicit
        width that cannot hold it is an error.
        """
        g = make_grid("qs4d", levels)
        return cls(g.bits if width is None else width, g.qmin, g.qmax)

    @property
    def maxabs(self) -> int:
        return max(-self.qmin, self.qmax)

    def check(self, name: str, q: np.ndarray) -> np.ndarray:
        """Require an integer array whose values lie on this grid; return it as int64."""
        return check_in_range(name, q, self.qmin, self.qmax)


@njit(cache=True, inline="always")
def rne_shift(acc, shift):
    """``acc / 2**shift`` rounded half to even, for one int64 ``acc`` and a shift in [0, 62]: the
    golden model's one rounding rule (``round_shift`` on arrays, ``golden.fast`` in its kernel).

    The quotient is the arithmetic right shift (floor); the remainder decides the increment:
    above half rounds up, exactly half rounds to the even neighbour. No addend is formed, so
    no value beyond |acc| is ever computed. Branch-free (selects and bitwise logic), so loops
    calling it vectorize; for shift 0 the remainder is 0 and half is 2**62: nothing rounds up.
    """
    q = acc >> shift
    rem = acc - (q << shift)
    half = np.int64(1) << max(shift - 1, 0) if shift > 0 else np.int64(1) << 62
    return q + np.int64((rem > half) | ((rem == half) & ((q & 1) == 1)))


@vectorize(["int64(int64, int64)"], cache=True)
def _round_shift(acc, shift):
    return rne_shift(acc, shift)


def round_shift(acc: np.ndarray, shift: np.ndarray | int) -> np.ndarray:
    """``rne_shift`` elementwise on int64 arrays (broadcast), shifts in [0, 62]."""
    return _round_shift(np.asarray(acc, dtype=np.int64), np.asarray(shift, dtype=np.int64))


def saturate(v: np.ndarray, fmt: IntFormat) -> tuple[np.ndarray, np.ndarray]:
    """Clamp ``v`` to the grid of ``fmt``; return (clamped, int64 0/1 saturation flags)."""
    flags = ((v < fmt.qmin) | (v > fmt.qmax)).astype(np.int64)
    return np.clip(v, fmt.qmin, fmt.qmax), flags


def requantize(terms: Sequence[np.ndarray], multipliers: Sequence[np.ndarray],
               shift: np.ndarray, fmt: IntFormat, offset: np.ndarray | None = None, *,
               return_acc: bool = False) -> tuple[np.ndarray, ...]:
    """Single-rounding requantization of a sum of integer products.

    out = saturate(round_half_even((sum_k terms[k] * multipliers[k] + offset) / 2**shift)).
    Each term carries its own scale, folded into its multiplier; all terms
    share one shift so the exact sum is rounded once. ``offset`` (a folded
    BatchNorm shift) is already at the scale of the multiplied sum. The caller
    guarantees (see ``check_headroom``) that the sum fits int64. Returns
    (out, flags), and with ``return_acc`` also the exact sum before rounding.
    """
    acc = np.zeros(np.broadcast(*terms, *multipliers, shift).shape, dtype=np.int64)
    for term, mult in zip(terms, multipliers):
        acc += term * mult
    if offset is not None:
        acc += offset
    out, flags = saturate(round_shift(acc, shift), fmt)
    return (out, flags, acc) if return_acc else (out, flags)


def rounding_events(acc: np.ndarray, shift: np.ndarray | int, fmt: IntFormat) -> dict[str, int]:
    """Counts of what the tie rule and the clamp decide on ``acc`` rounded by ``shift`` onto ``fmt``.

    ``ties_even`` / ``ties_odd``: exact ties (remainder exactly 2**(shift-1)) whose floor is even
    (kept) or odd (rounded up) and whose rounded word lies on the grid, so the output shows the
    rule (a clamped tie does not); ``sat_low`` / ``sat_high``: words clamped to qmin / qmax.
    """
    acc = np.asarray(acc, dtype=np.int64)
    shift = np.broadcast_to(np.asarray(shift, dtype=np.int64), acc.shape)
    q = acc >> shift  # the floor
    rem = acc - (q << shift)
    half = np.where(shift > 0, np.int64(1) << np.maximum(shift - 1, 0), -1)
    rounded = round_shift(acc, shift)
    inside = (rounded >= fmt.qmin) & (rounded <= fmt.qmax)
    tie = (rem == half) & inside
    odd = (q & 1) == 1
    return {"ties_even": int(np.count_nonzero(tie & ~odd)), "ties_odd": int(np.count_nonzero(tie & odd)),
            "sat_low": int(np.count_nonzero(rounded < fmt.qmin)),
            "sat_high": int(np.count_nonzero(rounded > fmt.qmax))}


def check_headroom(name: str, term_bounds: Sequence[int], multipliers: Sequence[np.ndarray],
                   shift: np.ndarray) -> None:
    """Fail unless sum_k term_bounds[k] * multipliers[k] < 2**63 at every position, shift in [0, 62].

    ``term_bounds`` are worst-case |term| from the tensor grids; this is what
    makes the int64 path exact for every input on the grids.
    """
    shift = np.asarray(shift)
    if shift.size and (shift.min() < 0 or shift.max() > MAX_SHIFT):
        raise ValueError(f"{name} shift must lie in [0, {MAX_SHIFT}], got range "
                         f"[{int(shift.min())}, {int(shift.max())}]")
    worst = 0
    for bound, mult in zip(term_bounds, multipliers):
        mult = np.asarray(mult)
        if mult.size and (mult.min() < 0 or mult.max() >= MULT_LIMIT):
            raise ValueError(f"{name} multipliers must lie in [0, 2**63) (signs live in the "
                             f"weights), got range [{int(mult.min())}, {int(mult.max())}]")
        # object dtype: Python ints, so the check itself cannot overflow
        worst = worst + mult.astype(object) * int(bound)
    worst = int(np.max(worst))
    if worst >= INT64_BOUND:
        raise ValueError(f"{name} accumulator needs up to {worst.bit_length() + 1} bits "
                         f"(worst case {worst}); the int64 golden model allows 64: "
                         f"narrow the widths or the multipliers")
