"""Quantized-state recurrent S4D scan (Zhao et al. 2025) and its BPTT backward.

One layer, H channels, M = N/2 complex modes, sequences u (B, L, H). The
discrete parameters arrive already (fake-)quantized by the caller and are
passed as real/imaginary planes, each (H, M); D is (H,). Per step, for every
(b, h, n), in exactly this order (the golden model reproduces it):

    1. vr = (Ar*xr - Ai*xi) + Br*u_t ;  vi = (Ar*xi + Ai*xr) + Bi*u_t
    2. clip each part to [-clip, clip]                      (w)
    3. if quantize: q = clamp(round(w * inv), qmin, qmax)   (round by ``mode``, then
       saturate; separate ``inv`` for the real and the imaginary part, per channel)
       x = q / inv                                         (else x = w)
    4. acc += Cr*xr - Ci*xi                  (n = 0..M-1, acc a float64 from 0)
    y_t = 2*acc + D*u_t.

The state quantizer is symmetric (zero point 0). With a power-of-two ``inv``
steps 3's multiply and divide are exact, so the integer state code q is the
golden model's state register. x_{-1} = 0. The forward can also record
max |w| per channel and part (what a running state range observes in training,
from the quantized scan itself, at ~1.1x the plain forward's cost).

Backward: STE through the quantizer (``clipped_ste``: also zero where the code
saturated, i.e. round(v) fell outside [qmin, qmax]), zero gradient where the
clip was active, and the LSQ derivative of x w.r.t. the step 1/inv:
round(v) - v where the code did not saturate, qmin/qmax where it did
(v = w*inv). The forward keeps no states: the backward recomputes each
sequence's states into a per-channel (L+1, M) buffer, and in the reverse sweep
each step's masks and step terms from x_{t-1} into a (4, M) scratch. Variants
measured slower on the 2-core test machine (B 64, L 784, M 32, single thread):
storing the masks and step terms in the rebuild pass ((4, L, M) per channel;
~1.1-1.3x the time), one fused loop over the modes for all sums (~1.4x),
sequences in SIMD lanes (no faster). The forward's ``prange`` runs over
batch*channels; the backward's over channels, so each channel's gradients are
summed over (b, t) by one thread in a fixed order into float64 (no
cross-thread reduction buffers): results do not depend on the thread count
and, in float64, the twin ``reference/quant.py`` matches bit for bit. The
adjoint and the step terms are carried in the input's dtype: in float32 a
step's vector loops run 8 lanes instead of 4 (measured ~1.3-1.4x faster than a
float64 adjoint for float32 input), each sequence's gradient sums (L terms) are
formed in float32 and added into float64 totals in order b = 0..B-1, so the
float32 error is bounded by gamma_k(2**-24) * sum|terms| with k ~ L*(M + 6)
(tests/test_quant_scan.py derives it). No fastmath.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from qs4d_np.kernels.fake_quant import lsq_step_term, round_code


@njit(cache=True, inline="always")
def _state_step(xr, xi, ar, ai, br, bi, ut, clip, quantize, inv_r, inv_i, qmin, qmax, mode):
    """Steps 1-3 for one mode: returns (new xr, new xi, pre-clip vr, vi, clipped wr, wi)."""
    vr = (ar * xr - ai * xi) + br * ut
    vi = (ar * xi + ai * xr) + bi * ut
    wr = min(max(vr, -clip), clip)
    wi = min(max(vi, -clip), clip)
    if quantize:
        nr = min(max(round_code(wr * inv_r, mode), qmin), qmax) / inv_r
        ni = min(max(round_code(wi * inv_i, mode), qmin), qmax) / inv_i
    else:
        nr, ni = wr, wi
    return nr, ni, vr, vi, wr, wi


@njit(cache=True, inline="always")
def _advance(xr, xi, ar, ai, br, bi, ut, clip, quantize, inv_r, inv_i, qmin, qmax, mode, observe, m_r, m_i):
    """Steps 1-3 for all modes of one channel, in place (x_{t-1} -> x_t); with ``observe`` also
    m_r[n], m_i[n] = max(m, |w|) (untouched otherwise). np.maximum / np.abs, not the builtins:
    those did not vectorize (the builtin max measured ~3x slower on its own, the observed
    forward ~1.6x the plain one; with np.maximum ~1.1x)."""
    for n in range(xr.shape[0]):
        xr[n], xi[n], _, _, wr, wi = _state_step(xr[n], xi[n], ar[n], ai[n], br[n], bi[n], ut, clip,
                                                 quantize, inv_r, inv_i, qmin, qmax, mode)
        if observe:
            m_r[n] = np.maximum(m_r[n], np.abs(wr))
            m_i[n] = np.maximum(m_i[n], np.abs(wi))


@njit(cache=True, inline="always")
def _advance_dispatch(xr, xi, ar, ai, br, bi, ut, clip, quantize, inv_r, inv_i, qmin, qmax, mode, observe,
                      m_r, m_i):
    """``_advance`` with the common cases' flags as literals: after inlining, the float and the
    ties-to-even loops carry no branches on them and vectorize (measured ~2.5x faster).
    ``observe`` must be a literal at the call site too."""
    if not quantize:
        _advance(xr, xi, ar, ai, br, bi, ut, clip, False, inv_r, inv_i, qmin, qmax, 0, observe, m_r, m_i)
    elif mode == 0:
        _advance(xr, xi, ar, ai, br, bi, ut, clip, True, inv_r, inv_i, qmin, qmax, 0, observe, m_r, m_i)
    else:
        _advance(xr, xi, ar, ai, br, bi, ut, clip, True, inv_r, inv_i, qmin, qmax, mode, observe, m_r, m_i)


@njit(cache=True, inline="always")
def _forward_row(u, b, h, ar, ai, br, bi, cr, ci, d, inv_r, inv_i, qmin, qmax, mode, clip, quantize,
                 observe, y, wmax):
    """Sequence b of channel h into y[b, :, h]; with ``observe`` (a literal) its max |w| per part
    into wmax[b*H + h]."""
    L = u.shape[1]
    M = ar.shape[0]
    xr = np.zeros(M, dtype=u.dtype)
    xi = np.zeros(M, dtype=u.dtype)
    m_r = np.zeros(M, dtype=u.dtype)
    m_i = np.zeros(M, dtype=u.dtype)
    for t in range(L):
        ut = u[b, t, h]
        # the state update and the read-out in separate loops: the first has no
        # loop-carried dependency and vectorizes, the second keeps the summation order
        _advance_dispatch(xr, xi, ar, ai, br, bi, ut, clip, quantize, inv_r, inv_i, qmin, qmax, mode, observe,
                          m_r, m_i)
        acc = 0.0
        for n in range(M):
            acc += cr[n] * xr[n] - ci[n] * xi[n]
        y[b, t, h] = 2.0 * acc + d * ut
    if observe:
        wmax[b * u.shape[2] + h, 0] = np.float64(m_r.max())
        wmax[b * u.shape[2] + h, 1] = np.float64(m_i.max())


@njit(cache=True, parallel=True)
def quant_scan_forward(u, Ar, Ai, Br, Bi, Cr, Ci, D, inv, qmin, qmax, mode, clip, quantize, y, wmax):
    """Fill y (B, L, H) with the quantized-state scan; inv (H, 2) codes per unit (re, im).

    wmax: (B*H, 2) float64, filled with each sequence's and channel's max |w| (the clipped
    pre-quantization values of step 2, real and imaginary part; row b*H + h) when it has
    B*H rows; pass a (0, 2) array to skip that. A max is exact, so reducing the rows in any
    order gives the same (H, 2) result."""
    B, L, H = u.shape
    observe = wmax.shape[0] > 0
    for bh in prange(B * H):
        b = bh // H
        h = bh % H
        if observe:
            _forward_row(u, b, h, Ar[h], Ai[h], Br[h], Bi[h], Cr[h], Ci[h], D[h], inv[h, 0], inv[h, 1], qmin,
                         qmax, mode, clip, quantize, True, y, wmax)
        else:
            _forward_row(u, b, h, Ar[h], Ai[h], Br[h], Bi[h], Cr[h], Ci[h], D[h], inv[h, 0], inv[h, 1], qmin,
                         qmax, mode, clip, quantize, False, y, wmax)


@njit(cache=True, inline="always")
def _ste_factors(v, w, inv, qmin, qmax, clip, quantize, clipped_ste, mode):
    """(dx/dv, dx/dstep) of one state part: the STE mask and the LSQ step term."""
    # selects only, no early returns: with literal flags the factor loop is branch-free
    mask = 0.0 if (v < -clip or v > clip) else 1.0
    if not quantize:
        return mask, 0.0
    s = w * inv
    r = round_code(s, mode)
    low = r < qmin
    high = r > qmax
    if clipped_ste and (low or high):
        mask = 0.0
    return mask, lsq_step_term(qmin if low else (qmax if high else r), s, low or high)


@njit(cache=True, inline="always")
def _factors(prev_r, prev_i, coef, u_t, clip, quantize, inv_r, inv_i, qmin, qmax, mode, clipped_ste, fac):
    """fac[0..3] (M,) = dx/dv and dx/dstep (real part), the same (imaginary part) of the step from
    x_{t-1} = prev; the step's pre-clip and clipped values are recomputed (cheaper than storing them)."""
    ar, ai, br, bi = coef
    for n in range(prev_r.shape[0]):
        _, _, vr, vi, wr, wi = _state_step(prev_r[n], prev_i[n], ar[n], ai[n], br[n], bi[n], u_t, clip,
                                           quantize, inv_r, inv_i, qmin, qmax, mode)
        fac[0, n], fac[1, n] = _ste_factors(vr, wr, inv_r, qmin, qmax, clip, quantize, clipped_ste, mode)
        fac[2, n], fac[3, n] = _ste_factors(vi, wi, inv_i, qmin, qmax, clip, quantize, clipped_ste, mode)


@njit(cache=True, parallel=True)
def quant_scan_backward(u, Ar, Ai, Br, Bi, Cr, Ci, D, inv, qmin, qmax, mode, clip, quantize,
                        clipped_ste, gy, du):
    """BPTT of ``quant_scan_forward``. Fills du (B, L, H); returns float64 gradients
    (dAr, dAi, dBr, dBi, dCr, dCi) each (H, M), dD (H,), dstep (H, 2) w.r.t. 1/inv.

    The adjoint and the per-step terms are carried in u's dtype. float64: every sum runs
    over (b, t) straight into the totals (the twin's order, bit for bit). float32: each
    sequence's sums (L terms) are formed in float32 and then added into the float64
    totals in order b = 0..B-1, so the float32 rounding grows with L, not with B*L."""
    B, L, H = u.shape
    M = Ar.shape[1]
    per_sequence = u.itemsize < 8  # float32
    dAr = np.zeros((H, M))
    dAi = np.zeros((H, M))
    dBr = np.zeros((H, M))
    dBi = np.zeros((H, M))
    dCr = np.zeros((H, M))
    dCi = np.zeros((H, M))
    dD = np.zeros(H)
    dstep = np.zeros((H, 2))
    for h in prange(H):
        # states x_{t-1} at row t (row 0 = x_{-1} = 0); the backward recomputes each step's
        # pre-clip value from them for the masks and step terms
        xs_r = np.zeros((L + 1, M), dtype=u.dtype)
        xs_i = np.zeros((L + 1, M), dtype=u.dtype)
        xw_r = np.empty(M, dtype=u.dtype)  # the recomputed state, in the forward's precision
        xw_i = np.empty(M, dtype=u.dtype)
        gx_r = np.empty(M, dtype=u.dtype)
        gx_i = np.empty(M, dtype=u.dtype)
        # this channel's sums live in locals (written once at the end): stores into the
        # shared (H, M) outputs inside the loop could not be kept in registers. In u's dtype:
        # the totals (float64) or one sequence's partial sums (float32)
        sums = np.zeros((6, M), dtype=u.dtype)
        gAr, gAi, gBr, gBi, gCr, gCi = sums[0], sums[1], sums[2], sums[3], sums[4], sums[5]
        zero = np.zeros(1, dtype=u.dtype)[0]
        gD = zero
        gs_r = zero
        gs_i = zero
        tot = np.zeros((6, M))  # float32: the float64 totals of gAr, gAi, gBr, gBi, gCr, gCi
        tD = 0.0
        ts_r = 0.0
        ts_i = 0.0
        fac = np.empty((4, M), dtype=u.dtype)  # dx/dv and dx/dstep of the real and imaginary parts
        a_r = np.empty(M, dtype=u.dtype)
        a_i = np.empty(M, dtype=u.dtype)
        ar_, ai_, br_, bi_, cr_, ci_ = Ar[h], Ai[h], Br[h], Bi[h], Cr[h], Ci[h]
        coef = (ar_, ai_, br_, bi_)
        inv_r = inv[h, 0]
        inv_i = inv[h, 1]
        for b in range(B):
            xw_r[:] = 0.0
            xw_i[:] = 0.0
            for t in range(L):
                # not observing (the last two arrays stay untouched)
                _advance_dispatch(xw_r, xw_i, ar_, ai_, br_, bi_, u[b, t, h], clip, quantize, inv_r, inv_i,
                                  qmin, qmax, mode, False, xw_r, xw_i)
                xs_r[t + 1] = xw_r
                xs_i[t + 1] = xw_i
            gx_r[:] = 0.0
            gx_i[:] = 0.0
            for t in range(L - 1, -1, -1):
                g = gy[b, t, h]
                g2 = g + g  # 2*g, exact: 2*c*g below is c*g2 in both precisions
                ut = u[b, t, h]
                gD += g * ut
                du_t = D[h] * g
                # the factors of this step, specialised like the forward (literal flags, the
                # STE rule too, so that the factor loop has no branch left)
                if not quantize:
                    _factors(xs_r[t], xs_i[t], coef, ut, clip, False, inv_r, inv_i, qmin, qmax, 0,
                             False, fac)
                elif mode == 0 and not clipped_ste:
                    _factors(xs_r[t], xs_i[t], coef, ut, clip, True, inv_r, inv_i, qmin, qmax, 0,
                             False, fac)
                elif mode == 0:
                    _factors(xs_r[t], xs_i[t], coef, ut, clip, True, inv_r, inv_i, qmin, qmax, 0,
                             True, fac)
                else:
                    _factors(xs_r[t], xs_i[t], coef, ut, clip, True, inv_r, inv_i, qmin, qmax, mode,
                             clipped_ste, fac)
                m_r, s_r, m_i, s_i = fac[0], fac[1], fac[2], fac[3]
                # short loops over few arrays each, so that every one vectorizes; every
                # accumulator still sees its terms in the twin's order (n inside t)
                for n in range(M):
                    a_r[n] = gx_r[n] + cr_[n] * g2
                    a_i[n] = gx_i[n] - ci_[n] * g2
                for n in range(M):
                    gCr[n] += g2 * xs_r[t + 1, n]
                    gCi[n] -= g2 * xs_i[t + 1, n]
                for n in range(M):
                    s_r[n] = a_r[n] * s_r[n]
                    s_i[n] = a_i[n] * s_i[n]
                    m_r[n] = a_r[n] * m_r[n]  # gv: the gradient at the pre-clip value
                    m_i[n] = a_i[n] * m_i[n]
                for n in range(M):
                    pr = xs_r[t, n]
                    pi = xs_i[t, n]
                    gAr[n] += m_r[n] * pr + m_i[n] * pi
                    gAi[n] += m_i[n] * pr - m_r[n] * pi
                for n in range(M):
                    gBr[n] += m_r[n] * ut
                    gBi[n] += m_i[n] * ut
                    a_r[n] = m_r[n] * br_[n] + m_i[n] * bi_[n]  # du_t's terms
                for n in range(M):
                    gx_r[n] = m_r[n] * ar_[n] + m_i[n] * ai_[n]
                    gx_i[n] = m_i[n] * ar_[n] - m_r[n] * ai_[n]
                for n in range(M):
                    gs_r += s_r[n]
                    gs_i += s_i[n]
                    du_t += a_r[n]
                du[b, t, h] = du_t
            if per_sequence:  # this sequence's partial sums into the float64 totals
                for k in range(6):
                    for n in range(M):
                        tot[k, n] += np.float64(sums[k, n])
                sums[:] = 0.0
                tD += np.float64(gD)
                ts_r += np.float64(gs_r)
                ts_i += np.float64(gs_i)
                gD = zero
                gs_r = zero
                gs_i = zero
        if not per_sequence:
            tot[:] = sums
            tD, ts_r, ts_i = np.float64(gD), np.float64(gs_r), np.float64(gs_i)
        dAr[h] = tot[0]
        dAi[h] = tot[1]
        dBr[h] = tot[2]
        dBi[h] = tot[3]
        dCr[h] = tot[4]
        dCi[h] = tot[5]
        dD[h] = tD
        dstep[h, 0] = ts_r
        dstep[h, 1] = ts_i
    return dAr, dAi, dBr, dBi, dCr, dCi, dD, dstep


@njit(cache=True, parallel=True)
def quant_scan_state_absmax(u, Ar, Ai, Br, Bi, inv, qmin, qmax, mode, clip, quantize):
    """max |x_t| over batch, time and modes, per channel and part: (H, 2) float64.

    The states are those of ``quant_scan_forward`` with the same arguments (run it
    with ``quantize=False`` to calibrate a state quantizer from float states).
    """
    B, L, H = u.shape
    M = Ar.shape[1]
    out = np.zeros((H, 2))
    for h in prange(H):
        ar, ai, br, bi = Ar[h], Ai[h], Br[h], Bi[h]
        xr = np.zeros(M, dtype=u.dtype)
        xi = np.zeros(M, dtype=u.dtype)
        # per-mode maxima (elementwise, vectorizes; max is exact, so the order does not matter)
        m_r = np.zeros(M, dtype=u.dtype)
        m_i = np.zeros(M, dtype=u.dtype)
        for b in range(B):
            xr[:] = 0.0
            xi[:] = 0.0
            for t in range(L):
                _advance_dispatch(xr, xi, ar, ai, br, bi, u[b, t, h], clip, quantize, inv[h, 0], inv[h, 1],
                                  qmin, qmax, mode, False, m_r, m_i)
                for n in range(M):
                    m_r[n] = np.maximum(m_r[n], np.abs(xr[n]))
                    m_i[n] = np.maximum(m_i[n], np.abs(xi[n]))
        out[h, 0] = np.float64(m_r.max())
        out[h, 1] = np.float64(m_i.max())
    return out
