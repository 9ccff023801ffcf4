"""Real scale ratios to integer multipliers and shifts (export time, float in).

This is the only golden module that touches floats: it turns the float
scales of a trained model into the integers the integer path runs on
(docs/integer_spec.md, section 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

from qs4d_np.core.checks import check_array, check_float, check_int
from qs4d_np.golden.fixedpoint import INT64_BOUND, MAX_SHIFT, MULT_LIMIT
from qs4d_np.golden.layer import SSMCoreFormats

MULT_BITS = 31
# A sum whose multiplier rounding may move the exact value by more than this
# many output LSBs is refused (the int64 headroom left too few bits).
MAX_EPS = 2.0 ** -8


def quantize_multiplier(ratio: float) -> tuple[int, int]:
    """TFLite-style (M0, shift) with M0 in [2**30, 2**31) and ratio ~= M0 / 2**shift.

    For one-term requantizations (docs/integer_spec.md, section 5). frexp gives
    ratio = q * 2**e with q in [0.5, 1); M0 = round_half_even(q * 2**31) (q * 2**31
    is exact in float64); if it rounds up to 2**31 it is halved and e
    incremented; shift = 31 - e must lie in [0, 62], i.e. ratio in about
    [2**-31, 2**31).
    """
    ratio = check_float("ratio", ratio, min_value=0.0, min_inclusive=False)
    q, e = math.frexp(ratio)
    m0 = round(q * (1 << MULT_BITS))  # Python round(): ties to even
    if m0 == 1 << MULT_BITS:
        m0 //= 2
        e += 1
    shift = MULT_BITS - e
    if not 0 <= shift <= MAX_SHIFT:
        raise ValueError(f"ratio {ratio!r} needs right shift {shift}; allowed is [0, {MAX_SHIFT}] "
                         f"(ratios in about [2**-31, 2**31))")
    return m0, shift


def shared_shift_multipliers(ratios: Sequence[float], term_bounds: Sequence[int]
                             ) -> tuple[list[int], int]:
    """Multipliers M_k and one shift R with ratio_k ~= M_k / 2**R for a sum of terms.

    R is the largest shift in [0, 62] with sum_k term_bounds[k] * M_k < 2**63
    (the int64 headroom) and every M_k < 2**63 (a multiplier is an int64 word,
    even where its term's bound is 0), M_k = round_half_even(ratio_k * 2**R). Each M_k is
    then off by at most 1/2, so the exact sum moves by at most
    eps = sum_k term_bounds[k] / 2**(R+1) output LSBs; eps > 2**-8 is refused.
    (A shared shift normalised to the largest ratio, TFLite-style, would leave
    a term with a small ratio but a large integer, e.g. Abar * x next to a
    large Bbar * u ratio, with too few multiplier bits.)
    """
    if len(ratios) != len(term_bounds) or not ratios:
        raise ValueError(f"ratios and term_bounds must be non-empty and equally long, "
                         f"got {len(ratios)} and {len(term_bounds)}")
    ratios = [check_float(f"ratios[{k}]", r, min_value=0.0, min_inclusive=False)
              for k, r in enumerate(ratios)]
    bounds = [check_int(f"term_bounds[{k}]", b, min_value=0) for k, b in enumerate(term_bounds)]
    shift = MAX_SHIFT
    while True:
        mults = [round(math.ldexp(r, shift)) for r in ratios]
        if sum(b * m for b, m in zip(bounds, mults)) < INT64_BOUND and max(mults) < MULT_LIMIT:
            break
        shift -= 1
        if shift < 0:
            acc = sum(b * m for b, m in zip(bounds, mults))
            raise ValueError(f"ratios {ratios} with term bounds {bounds} fit no shift in [0, {MAX_SHIFT}]: even "
                             f"at shift 0 the multipliers reach {max(mults)} and the accumulator bound "
                             f"{acc} (each must be < 2**63, int64); narrow the widths or the ratios")
    eps = sum(bounds) / 2.0 ** (shift + 1)
    if eps > MAX_EPS:
        raise ValueError(f"ratios {ratios} with term bounds {bounds} leave shift {shift} in int64, "
                         f"so multiplier rounding may move the result by {eps:.3g} LSB "
                         f"(allowed {MAX_EPS:.3g}); narrow the widths")
    return mults, shift


def _eps_shift(bounds: Sequence[int]) -> int:
    """The smallest shift R with sum(bounds) / 2**(R+1) <= MAX_EPS (section 2.3's worst-case error)."""
    total = sum(bounds)
    R = 0
    while total > MAX_EPS * 2.0 ** (R + 1):
        R += 1
    return R


@dataclass
class ShiftRule:
    """How an export chooses each requantization's shift (docs/integer_spec.md, section 2.4).

    Default: the largest shift the int64 headroom allows, per channel (section 2.3, what
    ``shared_shift_multipliers`` does). ``max_mult_bits`` B: the largest shift that also keeps every
    multiplier below 2**B; a site that would then exceed the error bound MAX_EPS is recorded in
    ``needs`` (site -> the smallest B that keeps it) and ``check`` refuses the export with the
    smallest B that works for every site. ``per_tensor``: one shift for every channel of a tensor
    (the smallest of the channels' shifts; refused where a channel's error bound would break).
    """

    max_mult_bits: int | None = None
    per_tensor: bool = False
    needs: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_mult_bits is not None:
            self.max_mult_bits = check_int("max_mult_bits", self.max_mult_bits, min_value=1, max_value=63)

    def choose(self, site: str, ratios: Sequence[Sequence[float]], bounds: Sequence[Sequence[int]],
               n_mults: int | None = None) -> tuple[list[list[int]], list[int]]:
        """Multipliers and shift per channel c of ``site`` for ratios[c], term bounds[c].

        The first ``n_mults`` terms (default: all) are multipliers, limited to ``max_mult_bits``; the
        rest (a BatchNorm offset) only need the int64 headroom.
        """
        shifts = []
        for c, (r, b) in enumerate(zip(ratios, bounds)):
            try:
                _, top = shared_shift_multipliers(r, b)
            except ValueError as exc:
                raise ValueError(f"{site}: {exc}") from None
            low = _eps_shift(b)  # <= top, since shared_shift_multipliers kept the error bound
            k = len(r) if n_mults is None else n_mults
            need = max(1, max(round(math.ldexp(x, low)) for x in r[:k]).bit_length())
            self.needs[site] = max(self.needs.get(site, 0), need)
            R = top
            if self.max_mult_bits is not None and need <= self.max_mult_bits:
                while max(round(math.ldexp(x, R)) for x in r[:k]) >= 1 << self.max_mult_bits:
                    R -= 1
            shifts.append((low, R))
        if self.per_tensor:
            common = min(R for _, R in shifts)
            worst = max(low for low, _ in shifts)
            if common < worst:
                raise ValueError(f"{site}: one shift per tensor is impossible: a channel needs shift >= {worst} "
                                 f"for the error bound {MAX_EPS:.3g} LSB, another allows at most {common}")
            shifts = [(low, common) for low, _ in shifts]
        mults = [[round(math.ldexp(x, R)) for x in r] for r, (_, R) in zip(ratios, shifts)]
        return mults, [R for _, R in shifts]

    def check(self) -> None:
        """Refuse when ``max_mult_bits`` is below what some site needs; name the smallest that works."""
        if self.max_mult_bits is None:
            return
        over = {s: n for s, n in self.needs.items() if n > self.max_mult_bits}
        if over:
            worst = sorted(over.items(), key=lambda kv: -kv[1])
            shown = ", ".join(f"{s} {n}" for s, n in worst[:4]) + (f" and {len(worst) - 4} more" if len(worst) > 4 else "")
            raise ValueError(f"max_mult_bits {self.max_mult_bits} is too narrow: with it the multiplier error of "
                             f"{len(over)} requantization(s) could exceed {MAX_EPS:.3g} LSB (spec sections 2.3 and 6; "
                             f"bits needed: {shown}); the smallest multiplier width that works for this model is "
                             f"{max(self.needs.values())}")


def ssm_core_multipliers(formats: SSMCoreFormats, *, s_u: ArrayLike, s_Abar_re: ArrayLike,
                         s_Abar_im: ArrayLike, s_Bbar_re: ArrayLike, s_Bbar_im: ArrayLike,
                         s_C_re: ArrayLike, s_C_im: ArrayLike, s_D: ArrayLike, s_x_re: ArrayLike,
                         s_x_im: ArrayLike, s_y: ArrayLike, H: int, N2: int, rule: ShiftRule | None = None,
                         site: str = "core") -> dict[str, np.ndarray]:
    """The SSM core's multipliers and shifts from its float step sizes (real = s * integer).

    ``s_Abar_*``, ``s_Bbar_*`` broadcast to (H, N2); ``s_u``, ``s_C_*``, ``s_D``,
    ``s_x_re``, ``s_x_im`` (the state's real and imaginary steps), ``s_y`` to
    (H,). State ratios (docs/integer_spec.md, section 3): s_Abar_re (the state
    step cancels), s_Abar_im * s_x_im / s_x_re into x_re and s_Abar_im * s_x_re
    / s_x_im into x_im, s_Bbar * s_u / s_x; output ratios 2 * s_C_re * s_x_re
    / s_y, 2 * s_C_im * s_x_im / s_y and s_D * s_u / s_y. One shift per (h, n)
    serves both state parts, one per h the output (``rule``: see ``ShiftRule``; its sites are
    ``<site>.x`` and ``<site>.y``). Returns int64 arrays keyed like ``SSMCore`` expects.
    """
    rule = ShiftRule() if rule is None else rule
    H = check_int("H", H, min_value=1)
    N2 = check_int("N2", N2, min_value=1)
    sc = {}
    for name, value in (("s_u", s_u), ("s_C_re", s_C_re), ("s_C_im", s_C_im), ("s_D", s_D),
                        ("s_x_re", s_x_re), ("s_x_im", s_x_im), ("s_y", s_y),
                        ("s_Abar_re", s_Abar_re), ("s_Abar_im", s_Abar_im),
                        ("s_Bbar_re", s_Bbar_re), ("s_Bbar_im", s_Bbar_im)):
        shape = (H, N2) if "bar" in name else (H,)
        arr = np.asarray(value, dtype=np.float64)
        try:
            arr = np.broadcast_to(arr, shape)
        except ValueError:
            raise ValueError(f"{name} must broadcast to {shape}, got shape {arr.shape}") from None
        check_array(name, arr)
        if arr.min() <= 0:
            raise ValueError(f"{name} must be > 0 everywhere, got min {arr.min()}")
        sc[name] = arr
    f = formats
    ax, bu = f.Abar.maxabs * f.x.maxabs, f.Bbar.maxabs * f.u.maxabs
    state_keys = ("m_a_re", "m_a_im_to_re", "m_a_im_to_im", "m_b_re", "m_b_im")
    out = {}
    state_r, state_b, out_r, out_b = [], [], [], []
    for h in range(H):
        su, sxr, sxi, sy = sc["s_u"][h], sc["s_x_re"][h], sc["s_x_im"][h], sc["s_y"][h]
        for n in range(N2):
            # one shift for both state parts: the headroom is checked over all five terms
            state_r.append([sc["s_Abar_re"][h, n], sc["s_Abar_im"][h, n] * sxi / sxr,
                            sc["s_Abar_im"][h, n] * sxr / sxi, sc["s_Bbar_re"][h, n] * su / sxr,
                            sc["s_Bbar_im"][h, n] * su / sxi])
            state_b.append([ax, ax, ax, bu, bu])
        out_r.append([2 * sc["s_C_re"][h] * sxr / sy, 2 * sc["s_C_im"][h] * sxi / sy, sc["s_D"][h] * su / sy])
        out_b.append([N2 * f.C.maxabs * f.x.maxabs, N2 * f.C.maxabs * f.x.maxabs, f.D.maxabs * f.u.maxabs])
    mults, shifts = rule.choose(f"{site}.x", state_r, state_b)
    for j, key in enumerate(state_keys):
        out[key] = np.array([m[j] for m in mults], dtype=np.int64).reshape(H, N2)
    out["r_x"] = np.array(shifts, dtype=np.int64).reshape(H, N2)
    mults, shifts = rule.choose(f"{site}.y", out_r, out_b)
    for j, key in enumerate(("m_c_re", "m_c_im", "m_d")):
        out[key] = np.array([m[j] for m in mults], dtype=np.int64)
    out["r_y"] = np.array(shifts, dtype=np.int64)
    return out
