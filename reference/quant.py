"""Slow, obviously-correct twins of the quantization kernels.

* ``round_ref``: the four rounding rules from np.rint plus an exact tie test
  (fmod is exact, so only true ties are moved);
* ``fake_quant_ref``: the quantizer written from its formulas with NumPy
  reductions over the non-channel axes;
* ``ste_backward_ref``: the clipped straight-through gradient and the LSQ step gradient
  element by element over the flat (G, P, C, Q) layout, sums in float64 in index order;
* ``quant_scan_ref`` / ``quant_scan_backward_ref``: the quantized-state scan
  as plain Python loops over Python floats (float64) in the kernel's
  operation order, keeping every state, so float64 results match the Numba
  kernels bit for bit.
"""
from __future__ import annotations

import math

import numpy as np


def round_ref(v: np.ndarray, rounding: str) -> np.ndarray:
    v = np.asarray(v)
    if rounding == "floor":
        return np.floor(v)
    even = np.rint(v)
    if rounding == "half_even":
        return even
    tie = np.fmod(np.abs(v), 1.0) == 0.5
    if rounding == "half_up":
        return np.where(tie, v + 0.5, even)
    if rounding == "half_away":
        return np.where(tie, v + np.sign(v) * 0.5, even)
    raise ValueError(rounding)


def grid_ref(grid: str, n: int, symmetric: bool) -> tuple[int, int, float]:
    """(qmin, qmax, qpos) from the table in qs4d_np/quant/grids.py."""
    if grid == "qs4d":
        return math.floor(-n / 2), math.floor(n / 2), n / 2
    if grid == "narrow" and symmetric:
        m = (n - 1) // 2
        return -m, m, float(m)
    return -(n // 2), n - 1 - n // 2, float(n // 2)


def fake_quant_ref(x, levels, *, grid="narrow", symmetric=True, axis=None, scale_mode="absmax",
                   fixed_range=None, rounding="half_even", power_of_two=False,
                   complex_mode="cartesian", min_range=1e-5):
    """Returns (x_hat, q, inv, zp); inv/zp broadcast against the (possibly stacked) parts."""
    x = np.asarray(x)
    if np.iscomplexobj(x):
        parts = np.stack([x.real, x.imag])
        part_axis = None if axis is None else axis % x.ndim + 1
        keep = (0,) if complex_mode == "cartesian" else ()
        keep += () if part_axis is None else (part_axis,)
    else:
        parts = x
        keep = () if axis is None else (axis % x.ndim,)
    dt = parts.dtype
    red = tuple(i for i in range(parts.ndim) if i not in keep)
    qmin, qmax, qpos = grid_ref(grid, levels, symmetric)
    if scale_mode == "absmax":
        lo = parts.min(axis=red, keepdims=True).astype(np.float64)
        hi = parts.max(axis=red, keepdims=True).astype(np.float64)
    elif scale_mode == "absmean":
        hi = 2 * np.abs(parts.astype(np.float64)).mean(axis=red, keepdims=True) * np.sqrt(qpos)
        lo = -hi
    else:  # fixed: one value or one per channel, broadcast like the reductions
        shape = np.ones(parts.ndim, dtype=int)
        shape[list(keep)] = [parts.shape[k] for k in keep]
        if symmetric:
            hi = np.broadcast_to(np.asarray(fixed_range, dtype=np.float64).reshape(-1), (int(np.prod(shape)),))
            hi = hi.reshape(shape)
            lo = -hi
        else:
            lo, hi = (np.broadcast_to(np.asarray(v, np.float64).reshape(-1), (int(np.prod(shape)),)).reshape(shape)
                      for v in fixed_range)
    if symmetric:
        r = np.maximum(np.maximum(np.abs(lo), np.abs(hi)).astype(dt), dt.type(min_range))
        inv = (qpos / r.astype(np.float64)).astype(dt)
    else:
        lo = np.minimum(lo, 0.0).astype(dt)
        hi = np.maximum(hi, 0.0).astype(dt)
        span = np.maximum(hi.astype(np.float64) - lo.astype(np.float64), dt.type(min_range)).astype(dt)
        inv = ((qmax - qmin) / span.astype(np.float64)).astype(dt)
    if power_of_two:
        inv64 = inv.astype(np.float64)
        p2 = 2.0 ** np.floor(np.log2(inv64))
        p2 = np.where(p2 > inv64, p2 / 2, p2)  # log2 of a value just below 2**k can round up to k
        inv = p2.astype(dt)
    zp = np.zeros_like(inv) if symmetric else (qmin - np.rint(lo * inv)).astype(dt)
    q = np.clip(round_ref(parts * inv, rounding) + zp, qmin, qmax).astype(dt)
    out = ((q - zp) / inv).astype(dt)
    if np.iscomplexobj(x):
        out = (out[0] + 1j * out[1]).astype(x.dtype)
    return out, q, inv, zp


def ste_backward_ref(x, grad, inv, zp, qmin, qmax, rounding, G, P, C, Q, codes=None):
    """Twin of ``kernels.fake_quant.ste_backward`` on a flat real tensor x (the layout (G, P, C, Q)):
    returns (dx, dstep) with dx[j] = grad[j] unless round(x[j]*inv[k]) + zp[k] leaves [qmin, qmax]
    (then 0), and dstep[k] (float64, G*C) the sum over channel k of grad[j] times d x_hat / d step:
    c - v inside the range, c where the code saturated (v = x*inv, c the code minus zp: ``codes``
    when given, else the clamped rounded value). v, c and c - v are computed in x's dtype, as the
    forward computes them; the products and sums in float64, in index order."""
    x, grad = np.asarray(x), np.asarray(grad)
    real = x.dtype.type
    lo, hi = real(qmin), real(qmax)
    dx = np.empty_like(x)
    dstep = np.zeros(G * C)
    for j in range(x.size):
        k = (j // (Q * C * P)) * C + (j // Q) % C  # channel g*C + c of element j
        v = x[j] * real(inv[k])
        z = real(zp[k])
        r = real(round_ref(v, rounding))
        saturated = r + z < lo or r + z > hi
        c = real(codes[j]) - z if codes is not None else min(max(r + z, lo), hi) - z
        dx[j] = 0.0 if saturated else grad[j]
        dstep[k] += float(grad[j]) * float(c if saturated else c - v)
    return dx, dstep


def _round_scalar(v: float, rounding: str) -> float:
    return float(round_ref(np.float64(v), rounding))


def _step(xr, xi, ar, ai, br, bi, ut, clip, inv_r, inv_i, qmin, qmax, rounding, quantize):
    vr = (ar * xr - ai * xi) + br * ut
    vi = (ar * xi + ai * xr) + bi * ut
    wr = min(max(vr, -clip), clip)
    wi = min(max(vi, -clip), clip)
    if not quantize:
        return wr, wi, vr, vi, wr, wi
    nr = min(max(_round_scalar(wr * inv_r, rounding), qmin), qmax) / inv_r
    ni = min(max(_round_scalar(wi * inv_i, rounding), qmin), qmax) / inv_i
    return nr, ni, vr, vi, wr, wi


def _surrogate_part(w, inv, qmin, qmax, key, frozen):
    """LSQ surrogate of the state quantizer (ties-to-even): (clip(s, qmin-1/2, qmax+1/2) + r) / inv
    with s = w*inv and r frozen; records r = code - clip(s) on first use of ``key``."""
    s = min(max(w * inv, qmin - 0.5), qmax + 0.5)
    if key not in frozen:
        frozen[key] = min(max(_round_scalar(s, "half_even"), qmin), qmax) - s
    return (s + frozen[key]) / inv


def _unpack(u, Abar, Bbar, C, D, inv):
    f = lambda a: np.asarray(a, dtype=np.float64).tolist()  # noqa: E731
    return (f(u), f(Abar.real), f(Abar.imag), f(Bbar.real), f(Bbar.imag), f(C.real), f(C.imag),
            f(D), f(inv))


def quant_scan_ref(u, Abar, Bbar, C, D, inv, qmin, qmax, rounding="half_even", clip=math.inf,
                   quantize=True, frozen=None, return_absmax=False, return_wmax=False):
    """Forward twin: y (B, L, H) float64; inv (H, 2). ``return_absmax`` also returns the
    (H, 2) max |Re x|, |Im x| over the states (the twin of ``quant_scan_state_absmax``);
    ``return_wmax`` (after it) the (H, 2) max |Re w|, |Im w| over the clipped
    pre-quantization values (the twin of the forward kernel's ``wmax``).

    With a dict ``frozen`` the state quantizer is replaced by its LSQ surrogate
    (``_surrogate_part``; residuals recorded on the first call, ties-to-even): equal to the
    quantized scan at the recording point, with the clipped-STE/LSQ gradients as its exact
    derivatives, so finite differences of it check the hand-written backward."""
    B, L, H = np.shape(u)
    M = np.shape(Abar)[1]
    u, Ar, Ai, Br, Bi, Cr, Ci, D, inv = _unpack(u, Abar, Bbar, C, D, inv)
    y = np.zeros((B, L, H))
    absmax = np.zeros((H, 2))
    wmax = np.zeros((H, 2))
    for b in range(B):
        for h in range(H):
            xr, xi = [0.0] * M, [0.0] * M
            for t in range(L):
                ut = u[b][t][h]
                acc = 0.0
                for n in range(M):
                    xr[n], xi[n], _, _, wr, wi = _step(xr[n], xi[n], Ar[h][n], Ai[h][n], Br[h][n], Bi[h][n],
                                                       ut, clip, inv[h][0], inv[h][1], qmin, qmax, rounding,
                                                       quantize and frozen is None)
                    wmax[h] = np.maximum(wmax[h], [abs(wr), abs(wi)])
                    if frozen is not None:
                        xr[n] = _surrogate_part(xr[n], inv[h][0], qmin, qmax, (b, h, t, n, 0), frozen)
                        xi[n] = _surrogate_part(xi[n], inv[h][1], qmin, qmax, (b, h, t, n, 1), frozen)
                    acc += Cr[h][n] * xr[n] - Ci[h][n] * xi[n]
                    absmax[h] = np.maximum(absmax[h], [abs(xr[n]), abs(xi[n])])
                y[b, t, h] = 2.0 * acc + D[h] * ut
    extra = [absmax] * return_absmax + [wmax] * return_wmax
    return (y, *extra) if extra else y


def quant_scan_backward_ref(u, Abar, Bbar, C, D, inv, qmin, qmax, gy, rounding="half_even",
                            clip=math.inf, quantize=True, clipped_ste=False, magnitudes=False):
    """BPTT twin: dict of du, Abar, Bbar, C (complex), D, step (H, 2), all float64.

    ``magnitudes``: the same adjoint recursion and sums (states and factors from the real
    forward) with every input, state and factor replaced by its absolute value and every
    subtraction by an addition: per output, the sum of |terms| over the whole evaluation
    tree, which bounds the rounding error of any evaluation in precision eps by
    gamma_k * that sum (k = the rounding depth; Higham, Accuracy and Stability, sec. 3.1)."""
    B, L, H = np.shape(u)
    M = np.shape(Abar)[1]
    u, Ar, Ai, Br, Bi, Cr, Ci, D, inv = _unpack(u, Abar, Bbar, C, D, inv)
    gy = np.asarray(gy, dtype=np.float64).tolist()
    out = {k: np.zeros((H, M)) for k in ("Ar", "Ai", "Br", "Bi", "Cr", "Ci")}
    dD, dstep, du = np.zeros(H), np.zeros((H, 2)), np.zeros((B, L, H))

    def factors(v, w, iv):
        mask = 0.0 if (v < -clip or v > clip) else 1.0
        if not quantize:
            return mask, 0.0
        s = w * iv
        r = _round_scalar(s, rounding)
        if r < qmin or r > qmax:
            return (0.0 if clipped_ste else mask), float(qmin if r < qmin else qmax)
        return mask, r - s

    for h in range(H):
        for b in range(B):
            xs = [([0.0] * M, [0.0] * M)]
            fac = []
            for t in range(L):
                prev_r, prev_i = xs[-1]
                new_r, new_i, f_t = [0.0] * M, [0.0] * M, []
                for n in range(M):
                    new_r[n], new_i[n], vr, vi, wr, wi = _step(
                        prev_r[n], prev_i[n], Ar[h][n], Ai[h][n], Br[h][n], Bi[h][n], u[b][t][h], clip,
                        inv[h][0], inv[h][1], qmin, qmax, rounding, quantize)
                    f_t.append(factors(vr, wr, inv[h][0]) + factors(vi, wi, inv[h][1]))
                xs.append((new_r, new_i))
                fac.append(f_t)
            gx_r, gx_i = [0.0] * M, [0.0] * M
            mag = abs if magnitudes else (lambda v: v)  # noqa: E731
            neg = 1.0 if magnitudes else -1.0  # a - b as a + neg*b: the same float64 result
            for t in range(L - 1, -1, -1):
                g, ut = mag(gy[b][t][h]), mag(u[b][t][h])
                dD[h] += g * ut
                du_t = mag(D[h]) * g
                for n in range(M):
                    ar_n, ai_n, br_n, bi_n = mag(Ar[h][n]), mag(Ai[h][n]), mag(Br[h][n]), mag(Bi[h][n])
                    xr, xi = mag(xs[t + 1][0][n]), mag(xs[t + 1][1][n])
                    ar = gx_r[n] + 2.0 * mag(Cr[h][n]) * g
                    ai = gx_i[n] + neg * (2.0 * mag(Ci[h][n]) * g)
                    out["Cr"][h, n] += 2.0 * g * xr
                    out["Ci"][h, n] += neg * (2.0 * g * xi)
                    mr, sr, mi, si = (mag(f) for f in fac[t][n])
                    dstep[h, 0] += ar * sr
                    dstep[h, 1] += ai * si
                    gvr, gvi = ar * mr, ai * mi
                    pr, pi = mag(xs[t][0][n]), mag(xs[t][1][n])
                    out["Ar"][h, n] += gvr * pr + gvi * pi
                    out["Ai"][h, n] += gvi * pr + neg * (gvr * pi)
                    out["Br"][h, n] += gvr * ut
                    out["Bi"][h, n] += gvi * ut
                    du_t += gvr * br_n + gvi * bi_n
                    gx_r[n] = gvr * ar_n + gvi * ai_n
                    gx_i[n] = gvi * ar_n + neg * (gvr * ai_n)
                du[b, t, h] = du_t
    return {"u": du, "Abar": out["Ar"] + 1j * out["Ai"], "Bbar": out["Br"] + 1j * out["Bi"],
            "C": out["Cr"] + 1j * out["Ci"], "D": dD, "step": dstep}
