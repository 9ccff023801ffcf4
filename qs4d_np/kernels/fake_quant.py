"""Numba kernels of the uniform quantizer: range statistics, fake-quant, STE backward.

Every kernel sees its tensor as one flat C-contiguous array with the logical
layout (G, P, C, Q): element i belongs to channel ``g*C + c``. A per-tensor
quantizer has G = C = 1; a per-channel one along axis a of shape S has
P = prod(S[:a]), C = S[a], Q = prod(S[a+1:]); complex tensors are stacked as
(real, imag) in front, with G = 2 for separate real/imaginary scales and G = 1
(the parts folded into P) for one shared scale.

The flat index is cut into fixed ``CHUNK``-element blocks for ``prange``, and
each block into runs: of one channel (at most Q elements; per tensor, the whole
block) or, when Q = 1 (per channel along the last axis), of consecutive
channels. A run is processed by an inlined ``_*_run`` helper whose rounding
rule is dispatched once per run: the inner loop has no integer division and
no branch on the rule, so LLVM vectorizes it (per tensor, fake quantization
then costs about one memory pass).
Sums are accumulated in float64 per block and the blocks added in order, so
results do not depend on the number of threads.

The code of one element is ``q = clamp(round(x * inv) + zp, qmin, qmax)`` and
its dequantized value ``(q - zp) / inv`` (``inv`` = codes per unit, the
reciprocal of the step). Rounding rules (``mode``): 0 ties-to-even, 1 ties
toward +inf, 2 ties away from zero, 3 floor. No fastmath: the golden model
relies on these exact operations. The NumPy twin is ``reference/quant.py``;
``disk_bound`` (complex codes kept inside a disk) has its own twin,
``reference/quant_disk.py``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

CHUNK = 16384
# float32 + float32 stays float32 and float64 + float32 stays float64: keeps round_code
# in its argument's dtype (a float64 literal would promote float32 results).
_ONE = np.float32(1.0)


@njit(cache=True)
def round_code(v, mode):
    """Round ``v`` to an integer-valued float by rule ``mode`` (see module docstring).

    The tie test works on |v|: |v| - floor(|v|) is exact for every float, so a
    value just below a half never passes for a tie.
    """
    if mode == 0:
        return np.rint(v)
    if mode == 3:
        return np.floor(v)
    a = abs(v)
    f = np.floor(a)
    d = a - f
    if mode == 2:
        up = d >= 0.5
    else:  # ties toward +inf: a negative tie rounds toward zero
        up = d > 0.5 or (d == 0.5 and v >= 0)
    r = f + _ONE if up else f
    return r if v >= 0 else -r


@njit(cache=True, inline="always")
def _block(blk, n, P, C, Q):
    """Flat range [start, stop) of block ``blk`` and the (q, c, p, g) counters of ``start``."""
    start = blk * CHUNK
    return (start, min(n, start + CHUNK), start % Q, (start // Q) % C, (start // (Q * C)) % P,
            start // (Q * C * P))


@njit(cache=True, inline="always")
def _segment(i, stop, qi, c, p, g, P, C, Q):
    """The run starting at flat index i with counters (qi, c, p, g): (its end, its first
    channel g*C + c, the channel step inside it, the counters at its end).

    Q > 1: a run of one channel (step 0). Q = 1 (per channel along the last axis): a run
    over consecutive channels c..C-1 (step 1), so runs stay long in that case too.
    """
    ch = g * C + c
    if Q == 1:
        seg = min(C - c, stop - i)
        c += seg
        step = 1
    else:
        seg = min(Q - qi, stop - i)
        qi += seg
        step = 0
        if qi == Q:
            qi = 0
            c += 1
    if c == C:
        c = 0
        p += 1
        if p == P:
            p = 0
            g += 1
    return i + seg, ch, step, qi, c, p, g


@njit(cache=True, inline="always")
def _stats_run(x, i, end, want_sum):
    """(min, max, sum|x| in float64, non-finite count) of x[i:end], branch-free."""
    lo = x[i]
    hi = x[i]
    nbad = 0
    for j in range(i, end):
        v = x[j]
        lo = min(lo, v)
        hi = max(hi, v)
        nbad += not abs(v) < np.inf
    acc = 0.0
    if want_sum:  # a serial float64 chain, the slowest part: only when asked
        for j in range(i, end):
            acc += abs(x[j])
    return lo, hi, acc, nbad


@njit(cache=True, inline="always")
def _stats_cols(x, i, end, ch0, pmin, pmax, psum):
    """Fold x[i:end], element j of channel ch0 + j - i, into one block's partial rows;
    returns the non-finite count (sums always: one add per element is cheap here)."""
    nbad = 0
    for j in range(i, end):
        k = ch0 + j - i
        v = x[j]
        pmin[k] = min(pmin[k], v)
        pmax[k] = max(pmax[k], v)
        psum[k] += abs(v)
        nbad += not abs(v) < np.inf
    return nbad


@njit(cache=True, parallel=True)
def tensor_stats(x, G, P, C, Q, want_sum):
    """Per-channel (min, max, sum|x| as float64 or zeros unless ``want_sum``, count of
    non-finite entries). min/max/sum are meaningless when the count is positive; the
    caller raises then.
    """
    n = x.size
    nch = G * C
    nblocks = max(1, (n + CHUNK - 1) // CHUNK)
    pmin = np.full((nblocks, nch), np.inf)
    pmax = np.full((nblocks, nch), -np.inf)
    psum = np.zeros((nblocks, nch))
    bad = np.zeros(nblocks, np.int64)
    for blk in prange(nblocks):
        i, stop, qi, c, p, g = _block(blk, n, P, C, Q)
        if nch == 1:  # per tensor: one run per block
            pmin[blk, 0], pmax[blk, 0], psum[blk, 0], bad[blk] = _stats_run(x, i, stop, want_sum)
            continue
        while i < stop:
            end, ch, step, qi, c, p, g = _segment(i, stop, qi, c, p, g, P, C, Q)
            if step == 1:
                bad[blk] += _stats_cols(x, i, end, ch, pmin[blk], pmax[blk], psum[blk])
                i = end
                continue
            lo, hi, acc, nbad = _stats_run(x, i, end, want_sum)
            pmin[blk, ch] = min(pmin[blk, ch], lo)
            pmax[blk, ch] = max(pmax[blk, ch], hi)
            psum[blk, ch] += acc
            bad[blk] += nbad
            i = end
    mins = np.full(nch, np.inf)
    maxs = np.full(nch, -np.inf)
    sums = np.zeros(nch)
    for blk in range(nblocks):
        for ch in range(nch):
            mins[ch] = min(mins[ch], pmin[blk, ch])
            maxs[ch] = max(maxs[ch], pmax[blk, ch])
            sums[ch] += psum[blk, ch]
    return mins, maxs, sums, bad.sum()


@njit(cache=True, inline="always")
def lsq_step_term(c, v, saturated):
    """d x_hat / d step of one element in units of the step (LSQ, Esser et al. 2020): ``c - v``
    where the code did not saturate (``c`` the code minus the zero point, ``v`` = x/step), the
    saturated code ``c`` where it did. The learned step's gradient sums grad * this term and
    scales the sum by ``lsq_grad_scale``; ``ste_backward`` and ``kernels.quant_scan`` both use it."""
    return c if saturated else c - v


def lsq_grad_scale(count: float, qpos: float) -> float:
    """LSQ's gradient scale 1/sqrt(count * qpos), ``count`` the values each step quantizes."""
    return 1.0 / np.sqrt(count * qpos)


@njit(cache=True, inline="always")
def _quantize_run(x, out, codes, want_codes, i, end, inv, zp, ch0, chstep, qmin, qmax, mode):
    """Fake-quantize x[i:end]; element j uses channel ch0 + (j - i) * chstep (chstep 0: one
    channel, 1: consecutive channels, the last-axis case). Returns the non-finite count."""
    nbad = 0
    if mode == 0:  # the default, with np.rint inline
        for j in range(i, end):
            k = ch0 + (j - i) * chstep
            v = x[j]
            nbad += not abs(v) < np.inf
            q = min(max(np.rint(v * inv[k]) + zp[k], qmin), qmax)
            out[j] = (q - zp[k]) / inv[k]
            if want_codes:
                codes[j] = q
    else:
        for j in range(i, end):
            k = ch0 + (j - i) * chstep
            v = x[j]
            nbad += not abs(v) < np.inf
            q = min(max(round_code(v * inv[k], mode) + zp[k], qmin), qmax)
            out[j] = (q - zp[k]) / inv[k]
            if want_codes:
                codes[j] = q
    return nbad


@njit(cache=True, parallel=True)
def fake_quant_forward(x, inv, zp, qmin, qmax, mode, G, P, C, Q, out, codes, want_codes):
    """out = dequantized x; codes = integer codes (as floats) when ``want_codes``.

    inv, zp: (G*C,) in x's dtype. Returns the number of non-finite inputs
    (their outputs are left unspecified; the caller raises).
    """
    n = x.size
    nblocks = max(1, (n + CHUNK - 1) // CHUNK)
    bad = np.zeros(nblocks, np.int64)
    for blk in prange(nblocks):
        i, stop, qi, c, p, g = _block(blk, n, P, C, Q)
        if G * C == 1:  # per tensor: one run per block, no segment bookkeeping
            bad[blk] = _quantize_run(x, out, codes, want_codes, i, stop, inv, zp, 0, 0, qmin, qmax, mode)
            continue
        while i < stop:
            end, ch, step, qi, c, p, g = _segment(i, stop, qi, c, p, g, P, C, Q)
            bad[blk] += _quantize_run(x, out, codes, want_codes, i, end, inv, zp, ch, step, qmin, qmax, mode)
            i = end
    return bad.sum()


@njit(cache=True, inline="always")
def _ste_run(x, grad, dx, i, end, inv, zp, ch0, chstep, qmin, qmax, mode, want_step, pstep, codes):
    """Clipped STE over x[i:end] into dx (channels as in ``_quantize_run``); adds
    grad * d x_hat / d step to pstep[channel] (float64) when ``want_step``. ``codes`` (empty:
    recompute them by the rounding rule) are the codes the forward chose."""
    acc = 0.0
    use_codes = codes.size > 0
    for j in range(i, end):
        k = ch0 + (j - i) * chstep
        v = x[j] * inv[k]
        z = zp[k]
        r = round_code(v, mode)
        if use_codes:
            c = codes[j] - z
        elif r + z < qmin:
            c = qmin - z
        elif r + z > qmax:
            c = qmax - z
        else:
            c = r
        saturated = r + z < qmin or r + z > qmax
        dx[j] = 0.0 if saturated else grad[j]
        d = lsq_step_term(c, v, saturated)
        if want_step:  # in float64: the product of two float32 values is then exact
            gd = np.float64(grad[j]) * np.float64(d)
            if chstep == 0:
                acc += gd
            else:
                pstep[k] += gd
    if want_step and chstep == 0:
        pstep[ch0] += acc


@njit(cache=True, parallel=True)
def ste_backward(x, grad, inv, zp, qmin, qmax, mode, G, P, C, Q, want_step, dx, codes):
    """Clipped STE and the LSQ step gradient in one pass.

    dx = grad where the code did not saturate (qmin <= round(x*inv) + zp <= qmax),
    else 0: the element that absmax maps onto the top code keeps its gradient
    even when x*inv rounds a hair above qmax. When ``want_step``, also returns
    per channel (float64, G*C) the sum of grad * d(x_hat)/d(step) with
    step = 1/inv and x_hat = (q - zp) * step: q - zp - v where the code did
    not saturate, q - zp where it did (v = x*inv; the code frozen): the LSQ formula with
    round's derivative taken as 1. q is the forward's code: ``codes`` when given
    (the modulus-bounded complex quantizer, ``disk_bound``, may pick a neighbour of
    round(v)), else clamp(round(v) + zp) by the forward's ``mode``.
    """
    n = x.size
    nch = G * C
    nblocks = max(1, (n + CHUNK - 1) // CHUNK)
    pstep = np.zeros((nblocks, nch))
    for blk in prange(nblocks):
        i, stop, qi, c, p, g = _block(blk, n, P, C, Q)
        while i < stop:
            end, ch, step, qi, c, p, g = _segment(i, stop, qi, c, p, g, P, C, Q)
            _ste_run(x, grad, dx, i, end, inv, zp, ch, step, qmin, qmax, mode, want_step, pstep[blk], codes)
            i = end
    out = np.zeros(nch)
    for blk in range(nblocks):
        for ch in range(nch):
            out[ch] += pstep[blk, ch]
    return out


# -- the modulus bound of complex codes -------------------------------------------
@njit(cache=True, inline="always")
def _channel(j, P, C, Q):
    """Channel g*C + c of flat index j in the layout (G, P, C, Q)."""
    return (j // (Q * C * P)) * C + (j // Q) % C


@njit(cache=True, inline="always")
def _admissible(kr, ki, inv_r, inv_i, m2):
    """Whether centered codes (kr, ki) dequantize inside the disk: (kr/inv_r)^2 + (ki/inv_i)^2 <= m2,
    all in float64 in this order (the definition the twin and the tests use)."""
    a = kr / inv_r
    b = ki / inv_i
    return a * a + b * b <= m2


@njit(cache=True, inline="always")
def _corner(u, zero_ward, z, qmin, qmax):
    """A neighbour of u on the centered grid: trunc(u) (``zero_ward``) or the other one of
    floor(u), ceil(u), saturated like every code (clamp(k + z, qmin, qmax) - z)."""
    if (u >= 0) == zero_ward:
        k = np.floor(u)
    else:
        k = np.ceil(u)
    return min(max(k + z, qmin), qmax) - z


@njit(cache=True, parallel=True)
def disk_bound(x, inv, zp, qmin, qmax, G, P, C, Q, max_modulus, out, codes):
    """Move the complex codes that dequantize outside the disk |z| <= max_modulus.

    Runs after ``fake_quant_forward`` (with codes) on a complex tensor flattened as
    (real parts, imaginary parts): the pair (i, i + x.size/2) is one value. A pair whose
    codes pass ``_admissible`` is left alone. Otherwise x is first projected radially
    onto the circle when |x| > max_modulus (in float64), and the codes become the
    admissible corner (``_corner`` of u = x*inv per part; u in x's dtype as in the first
    pass when x was not projected, in float64 when it was) nearest to x in value space
    (float64 squared distance); ties go to the earlier corner in the order (zero-ward re,
    zero-ward im), (zero-ward, outward), (outward, zero-ward), (outward, outward). In exact
    arithmetic the all-zero-ward corner is admissible; when x's rounding has put it a hair
    outside, the part of larger dequantized magnitude (ties: the real part) steps one code
    toward zero until admissible ((0, 0) always is). ``out`` gets (q - zp)/inv in x's dtype
    as in the first pass. Returns the number of values moved.
    """
    half = x.size // 2
    m = np.float64(max_modulus)
    m2 = m * m
    lo = np.float64(qmin)
    hi = np.float64(qmax)
    nblocks = max(1, (half + CHUNK - 1) // CHUNK)
    moved = np.zeros(nblocks, np.int64)
    for blk in prange(nblocks):
        for i in range(blk * CHUNK, min(half, (blk + 1) * CHUNK)):
            jr = i
            ji = i + half
            cr = _channel(jr, P, C, Q)
            ci = _channel(ji, P, C, Q)
            ivr = np.float64(inv[cr])
            ivi = np.float64(inv[ci])
            zr = np.float64(zp[cr])
            zi = np.float64(zp[ci])
            if _admissible(np.float64(codes[jr]) - zr, np.float64(codes[ji]) - zi, ivr, ivi, m2):
                continue
            xr = np.float64(x[jr])
            xi = np.float64(x[ji])
            r2 = xr * xr + xi * xi
            if r2 > m2:
                s = m / np.sqrt(r2)
                xr *= s
                xi *= s
                ur = xr * ivr
                ui = xi * ivi
            else:
                ur = np.float64(x[jr] * inv[cr])
                ui = np.float64(x[ji] * inv[ci])
            best = np.inf
            br = 0.0
            bi = 0.0
            for corner in range(4):
                ar = _corner(ur, corner < 2, zr, lo, hi)
                ai = _corner(ui, corner % 2 == 0, zi, lo, hi)
                if _admissible(ar, ai, ivr, ivi, m2):
                    dr = ar / ivr - xr
                    di = ai / ivi - xi
                    d = dr * dr + di * di
                    if d < best:
                        best = d
                        br = ar
                        bi = ai
            if best == np.inf:
                br = _corner(ur, True, zr, lo, hi)
                bi = _corner(ui, True, zi, lo, hi)
                while not _admissible(br, bi, ivr, ivi, m2):
                    if abs(br / ivr) >= abs(bi / ivi):
                        br -= np.sign(br)
                    else:
                        bi -= np.sign(bi)
            codes[jr] = br + zr
            codes[ji] = bi + zi
            out[jr] = (codes[jr] - zp[cr]) / inv[cr]
            out[ji] = (codes[ji] - zp[ci]) / inv[ci]
            moved[blk] += 1
    return moved.sum()
