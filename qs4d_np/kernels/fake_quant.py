"""Numba kernels of the uniform quantizer: range statistics, fake-quant, STE backward.

Every kernel sees its tensor as one flat C-contiguous array with the logical
layout (G, P, C, Q): element i belongs to channel ``g*C + c``. A per-tensor
quantizer has G = C = 1; a per-channel one along axis a of shape S has
P = prod(S[:a]), C = S[a], Q = prod(S[a+1:]); complex tensors are stacked as
(real, imag) in front, with G = 2 for separate real/imaginary scales and G = 1
(the parts folded into P) for one shared scale.

The flat index is cut into fixed ``CHUNK``-element blocks for ``prange``; the
channel of an element is tracked by counters instead of integer division (two
divisions per element would cost more than the memory traffic). Sums are
accumulated in float64 per block and the blocks added in order, so results do
not depend on the number of threads.

The code of one element is ``q = clamp(round(x * inv) + zp, qmin, qmax)`` and
its dequantized value ``(q - zp) / inv`` (``inv`` = codes per unit, the
reciprocal of the step). Rounding rules (``mode``): 0 ties-to-even, 1 ties
toward +inf, 2 ties away from zero, 3 floor. No fastmath: the golden model
relies on these exact operations. The NumPy twin is ``reference/quant.py``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

CHUNK = 16384


@njit(cache=True)
def round_code(v, mode):
    """Round ``v`` to an integer-valued float by rule ``mode`` (see module docstring).

    The tie test works on |v|: |v| - floor(|v|) is exact for every float, so a
    value just below a half never passes for a tie.
    """
    if mode == 0:
        return np.rint(v)
    if mode == 3:
        return math.floor(v)
    a = abs(v)
    f = math.floor(a)
    d = a - f
    if mode == 2:
        up = d >= 0.5
    else:  # ties toward +inf: a negative tie rounds toward zero
        up = d > 0.5 or (d == 0.5 and v >= 0)
    r = f + 1.0 if up else f
    return r if v >= 0 else -r


@njit(cache=True, inline="always")
def _block(blk, n, P, C, Q):
    """Flat range [start, stop) of block ``blk`` and the (q, c, p, g) counters of ``start``."""
    start = blk * CHUNK
    return (start, min(n, start + CHUNK), start % Q, (start // Q) % C, (start // (Q * C)) % P,
            start // (Q * C * P))


@njit(cache=True, inline="always")
def _advance(qi, c, p, g, Q, C, P):
    """The counters of the next flat index."""
    qi += 1
    if qi == Q:
        qi = 0
        c += 1
        if c == C:
            c = 0
            p += 1
            if p == P:
                p = 0
                g += 1
    return qi, c, p, g


@njit(cache=True, parallel=True)
def tensor_stats(x, G, P, C, Q):
    """Per-channel (min, max, sum|x| as float64, count of non-finite entries).

    Non-finite entries are skipped in min/max/sum; the caller raises when the
    count is positive.
    """
    n = x.size
    nch = G * C
    nblocks = max(1, (n + CHUNK - 1) // CHUNK)
    pmin = np.full((nblocks, nch), np.inf)
    pmax = np.full((nblocks, nch), -np.inf)
    psum = np.zeros((nblocks, nch))
    bad = np.zeros(nblocks, np.int64)
    for blk in prange(nblocks):
        start, stop, qi, c, p, g = _block(blk, n, P, C, Q)
        for i in range(start, stop):
            v = x[i]
            ch = g * C + c
            if math.isfinite(v):
                if v < pmin[blk, ch]:
                    pmin[blk, ch] = v
                if v > pmax[blk, ch]:
                    pmax[blk, ch] = v
                psum[blk, ch] += abs(v)
            else:
                bad[blk] += 1
            qi, c, p, g = _advance(qi, c, p, g, Q, C, P)
    mins = np.full(nch, np.inf)
    maxs = np.full(nch, -np.inf)
    sums = np.zeros(nch)
    for blk in range(nblocks):
        for ch in range(nch):
            mins[ch] = min(mins[ch], pmin[blk, ch])
            maxs[ch] = max(maxs[ch], pmax[blk, ch])
            sums[ch] += psum[blk, ch]
    return mins, maxs, sums, bad.sum()


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
        start, stop, qi, c, p, g = _block(blk, n, P, C, Q)
        for i in range(start, stop):
            ch = g * C + c
            v = x[i]
            if not math.isfinite(v):
                bad[blk] += 1
            q = round_code(v * inv[ch], mode) + zp[ch]
            q = min(max(q, qmin), qmax)
            out[i] = (q - zp[ch]) / inv[ch]
            if want_codes:
                codes[i] = q
            qi, c, p, g = _advance(qi, c, p, g, Q, C, P)
    return bad.sum()


@njit(cache=True, parallel=True)
def ste_backward(x, grad, inv, zp, qmin, qmax, mode, G, P, C, Q, want_step, dx):
    """Clipped STE and the LSQ step gradient in one pass.

    dx = grad where the code did not saturate (qmin <= round(x*inv) + zp <= qmax),
    else 0: the element that absmax maps onto the top code keeps its gradient
    even when x*inv rounds a hair above qmax. When ``want_step``, also returns
    per channel (float64, G*C) the sum of grad * d(x_hat)/d(step) with
    step = 1/inv and x_hat = (q - zp) * step: round(v) - v where the code did
    not saturate, (qmin - zp) or (qmax - zp) where it did (v = x*inv, round by
    the forward's ``mode``): the LSQ formula with round's derivative taken as 1.
    """
    n = x.size
    nch = G * C
    nblocks = max(1, (n + CHUNK - 1) // CHUNK)
    pstep = np.zeros((nblocks, nch))
    for blk in prange(nblocks):
        start, stop, qi, c, p, g = _block(blk, n, P, C, Q)
        for i in range(start, stop):
            ch = g * C + c
            v = x[i] * inv[ch]
            r = round_code(v, mode)
            if r + zp[ch] < qmin:
                dx[i] = 0.0
                d = qmin - zp[ch]
            elif r + zp[ch] > qmax:
                dx[i] = 0.0
                d = qmax - zp[ch]
            else:
                dx[i] = grad[i]
                d = r - v
            if want_step:
                pstep[blk, ch] += grad[i] * d
            qi, c, p, g = _advance(qi, c, p, g, Q, C, P)
    out = np.zeros(nch)
    for blk in range(nblocks):
        for ch in range(nch):
            out[ch] += pstep[blk, ch]
    return out
