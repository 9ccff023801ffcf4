"""Numba int64 kernel of the integer model: the same integers as ``IntegerModel.run``, faster.

Everything after the SSM core is pointwise in time, so running one layer over
whole sequences (``_layer_kernel``, ``prange`` over samples) gives the words of
the streaming order bit for bit. Per (sample, step) the kernel does exactly the
operations of docs/integer_spec.md section 5.2 in int64: exact products and
sums, one RNE shift, saturation. No floats, no fastmath. Traces are not kept
(use ``IntegerModel.run(trace=True)`` for them); saturation counts are.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from qs4d_np.golden.fixedpoint import rne_shift
from qs4d_np.golden.model import ROUNDED, IntegerModel, ModelTrace


@njit(cache=True, inline="always")
def _rne_sat(acc, shift, lo, hi):
    """(sat(RNE(acc / 2**shift)), 1 if clamped): ``fixedpoint.rne_shift`` then ``saturate``."""
    q = rne_shift(acc, shift)
    clamped = min(max(q, lo), hi)
    return clamped, np.int64(clamped != q)


@njit(cache=True, parallel=True)
def _layer_kernel(u, k_ar_re, k_ai_re, k_ai_im, k_ar_im, k_b_re, k_b_im, Cr, Ci, D, r_x, m_cr, m_ci, m_d, r_y,
                  grids, Wa, ba, ma, ra, Wb, bb, mb, rb, zb_qmin, lut, mg, rg, has_post, residual, pm0, pm1,
                  poff, psign, pr, out, sat):
    """One layer over u (B, L, H) int64 -> out (B, L, H); sat (B, 7) counts x_re, x_im, y, za, zb, act, out.

    grids (7, 2): [qmin, qmax] of x, y, za, zb, act, out and (unused) u. The state weights come
    premultiplied by their multipliers (k_ar = m_a_re * Abar_re, ...): M*(a*x) = (M*a)*x exactly,
    and |M*a| <= the headroom bound, so one product per term instead of two.
    """
    B, L, H = u.shape
    N2 = k_ar_re.shape[1]
    for b in prange(B):
        xr = np.zeros((H, N2), dtype=np.int64)
        xi = np.zeros((H, N2), dtype=np.int64)
        y = np.zeros(H, dtype=np.int64)
        # the mixing runs in W's dtype: int32 when its accumulator bound fits (AVX2 multiplies
        # 8 int32 lanes, no int64 lanes), else int64; the sums are exact either way
        ym = np.zeros(H, dtype=Wa.dtype)
        acc_a = np.zeros(H, dtype=Wa.dtype)
        acc_b = np.zeros(H, dtype=Wa.dtype)
        # saturation counts in locals (a store to sat[] per mode would block vectorization)
        n_re = n_im = n_y = n_a = n_b = n_g = n_o = np.int64(0)
        for t in range(L):
            for h in range(H):
                ut = u[b, t, h]
                s_re = np.int64(0)
                s_im = np.int64(0)
                for n in range(N2):
                    oxr, oxi = xr[h, n], xi[h, n]
                    acc_re = k_ar_re[h, n] * oxr - k_ai_re[h, n] * oxi + k_b_re[h, n] * ut
                    acc_im = k_ar_im[h, n] * oxi + k_ai_im[h, n] * oxr + k_b_im[h, n] * ut
                    nr, f_re = _rne_sat(acc_re, r_x[h, n], grids[0, 0], grids[0, 1])
                    ni, f_im = _rne_sat(acc_im, r_x[h, n], grids[0, 0], grids[0, 1])
                    xr[h, n] = nr
                    xi[h, n] = ni
                    n_re += f_re
                    n_im += f_im
                    s_re += Cr[h, n] * nr
                    s_im += Ci[h, n] * ni
                acc_y = m_cr[h] * s_re - m_ci[h] * s_im + m_d[h] * (D[h] * ut)
                y[h], f = _rne_sat(acc_y, r_y[h], grids[1, 0], grids[1, 1])
                n_y += f
            # row-major products: W[h, :] is contiguous, so accumulate over h in the outer loop
            for o in range(H):
                acc_a[o] = ba[o]
                acc_b[o] = bb[o]
            for h in range(H):
                ym[h] = y[h]
            for h in range(H):
                yh = ym[h]
                for o in range(H):
                    acc_a[o] += Wa[h, o] * yh
                    acc_b[o] += Wb[h, o] * yh
            for o in range(H):
                za, f_a = _rne_sat(ma[o] * np.int64(acc_a[o]), ra[o], grids[2, 0], grids[2, 1])
                zb, f_b = _rne_sat(mb[o] * np.int64(acc_b[o]), rb[o], grids[3, 0], grids[3, 1])
                act, f_g = _rne_sat(mg[o] * (za * lut[zb - zb_qmin]), rg[o], grids[4, 0], grids[4, 1])
                n_a += f_a
                n_b += f_b
                n_g += f_g
                if has_post:
                    acc = pm0[o] * act
                    if residual:
                        acc += pm1[o] * u[b, t, o]
                    acc = psign[o] * acc + poff[o]
                    v, f_o = _rne_sat(acc, pr[o], grids[5, 0], grids[5, 1])
                    n_o += f_o
                    out[b, t, o] = v
                else:
                    out[b, t, o] = act
        sat[b, 0], sat[b, 1], sat[b, 2], sat[b, 3] = n_re, n_im, n_y, n_a
        sat[b, 4], sat[b, 5], sat[b, 6] = n_b, n_g, n_o


def _mixing_words(layer) -> tuple[np.ndarray, ...]:
    """(W_a, b_a, W_b, b_b) as int32 when every partial sum of the mixing fits int32, else int64."""
    mix = (layer.mix_a, layer.mix_b)
    bound = max(l.W.shape[0] * l.w_fmt.maxabs * l.in_fmt.maxabs + int(np.abs(l.b).max()) for l in mix)
    dtype = np.int32 if bound < 1 << 31 else np.int64
    return tuple(a.astype(dtype) for l in mix for a in (l.W, l.b))


def _layer_args(layer) -> tuple:
    c, f = layer.core, layer.core.formats
    post = layer.post
    H = c.H
    zeros = np.zeros(H, dtype=np.int64)
    out_fmt = layer.out_fmt
    grids = np.array([[f.x.qmin, f.x.qmax], [f.y.qmin, f.y.qmax],
                      [layer.mix_a.requant.fmt.qmin, layer.mix_a.requant.fmt.qmax],
                      [layer.mix_b.requant.fmt.qmin, layer.mix_b.requant.fmt.qmax],
                      [layer.glu.fmt.qmin, layer.glu.fmt.qmax], [out_fmt.qmin, out_fmt.qmax],
                      [f.u.qmin, f.u.qmax]], dtype=np.int64)
    post_args = (False, False, zeros, zeros, zeros, zeros + 1, zeros) if post is None else (
        True, layer.residual, post.M[0], post.M[1] if layer.residual else zeros,
        zeros if post.offset is None else post.offset, zeros + 1 if post.sign is None else post.sign, post.R)
    k_ar = c.m_a_re * c.Abar_re
    Wa, ba, Wb, bb = _mixing_words(layer)
    return (k_ar, c.m_a_im_to_re * c.Abar_im, c.m_a_im_to_im * c.Abar_im, k_ar, c.m_b_re * c.Bbar_re,
            c.m_b_im * c.Bbar_im, c.C_re, c.C_im, c.D, c.r_x, c.m_c_re, c.m_c_im, c.m_d, c.r_y, grids,
            Wa, ba, layer.mix_a.requant.M[0], layer.mix_a.requant.R,
            Wb, bb, layer.mix_b.requant.M[0], layer.mix_b.requant.R,
            np.int64(layer.mix_b.requant.fmt.qmin), layer.sig_lut, layer.glu.M[0], layer.glu.R, *post_args)


def run_fast(model: IntegerModel, x: np.ndarray) -> ModelTrace:
    """``model.run(x)`` (no traces) through the Numba layer kernel; the same logits and counts."""
    x = model.in_fmt.check("x", x)
    if x.ndim != 3 or x.shape[1:] != (model.length, model.d_input):
        raise ValueError(f"x must have shape (batch, {model.length}, {model.d_input}), got {x.shape}")
    u, enc_flags = model.encoder(x)
    saturation = []
    for layer in model.layers:
        out = np.empty_like(u)
        sat = np.zeros((u.shape[0], len(ROUNDED)), dtype=np.int64)
        _layer_kernel(np.ascontiguousarray(u), *_layer_args(layer), out, sat)
        saturation.append(dict(zip(ROUNDED, (int(v) for v in sat.sum(axis=0)))))
        u = out
    pooled = u.sum(axis=1)
    avg, pool_flags = model.pool([pooled])
    logits, dec_flags = model.decoder(avg)
    saturation[0]["encoder"] = int(enc_flags.sum())
    saturation[-1]["avg"], saturation[-1]["logits"] = int(pool_flags.sum()), int(dec_flags.sum())
    return ModelTrace(logits, np.argmax(logits, axis=1), pooled, avg, saturation)
