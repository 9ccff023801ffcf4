"""Real scale ratios to integer multipliers and shifts (export time, float in).

This is the only golden module that touches floats: it turns the float
scales of a trained model into the integers the integer path runs on
(docs/integer_spec.md, section 3).
"""
from __future__ import annotations

import math
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


def ssm_core_multipliers(formats: SSMCoreFormats, *, s_u: ArrayLike, s_Abar_re: ArrayLike,
                         s_Abar_im: ArrayLike, s_Bbar_re: ArrayLike, s_Bbar_im: ArrayLike,
                         s_C_re: ArrayLike, s_C_im: ArrayLike, s_D: ArrayLike, s_x_re: ArrayLike,
                         s_x_im: ArrayLike, s_y: ArrayLike, H: int, N2: int) -> dict[str, np.ndarray]:
    """The SSM core's multipliers and shifts from its float step sizes (real = s * integer).

    ``s_Abar_*``, ``s_Bbar_*`` broadcast to (H, N2); ``s_u``, ``s_C_*``, ``s_D``,
    ``s_x_re``, ``s_x_im`` (the state's real and imaginary steps), ``s_y`` to
    (H,). State ratios (docs/integer_spec.md, section 3): s_Abar_re (the state
    step cancels), s_Abar_im * s_x_im / s_x_re into x_re and s_Abar_im * s_x_re
    / s_x_im into x_im, s_Bbar * s_u / s_x; output ratios 2 * s_C_re * s_x_re
    / s_y, 2 * s_C_im * s_x_im / s_y and s_D * s_u / s_y. One shift per (h, n)
    serves both state parts, one per h the output. Returns int64 arrays keyed
    like ``SSMCore`` expects.
    """
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
    out = {k: np.zeros((H, N2), dtype=np.int64) for k in state_keys + ("r_x",)}
    out.update({k: np.zeros(H, dtype=np.int64) for k in ("m_c_re", "m_c_im", "m_d", "r_y")})
    for h in range(H):
        su, sxr, sxi, sy = sc["s_u"][h], sc["s_x_re"][h], sc["s_x_im"][h], sc["s_y"][h]
        for n in range(N2):
            # one shift for both state parts: the headroom is checked over all five terms
            mults, shift = shared_shift_multipliers(
                [sc["s_Abar_re"][h, n], sc["s_Abar_im"][h, n] * sxi / sxr,
                 sc["s_Abar_im"][h, n] * sxr / sxi, sc["s_Bbar_re"][h, n] * su / sxr,
                 sc["s_Bbar_im"][h, n] * su / sxi], [ax, ax, ax, bu, bu])
            for key, m in zip(state_keys, mults):
                out[key][h, n] = m
            out["r_x"][h, n] = shift
        cx = N2 * f.C.maxabs * f.x.maxabs
        mults, shift = shared_shift_multipliers(
            [2 * sc["s_C_re"][h] * sxr / sy, 2 * sc["s_C_im"][h] * sxi / sy, sc["s_D"][h] * su / sy],
            [cx, cx, f.D.maxabs * f.u.maxabs])
        out["m_c_re"][h], out["m_c_im"][h], out["m_d"][h] = mults
        out["r_y"][h] = shift
    return out
