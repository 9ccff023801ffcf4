"""Loop twin of the fused streaming kernel ``qs4d_np.kernels.stream.stream_steps``.

The same signature and packed layout (``kernels.stream``'s docstring and index constants), the
model written out step by step, layer by layer, as plain Python loops over Python floats
(float64): encoder, norm (prenorm), the SSM recurrence per (batch, channel, mode), activation,
pointwise H -> 2H + GLU, act quantizer, residual, norm (postnorm), mean / last pooling. It
fills ``states_out``, ``pool_out`` and ``feat`` (rounded to their dtypes once, at the end: the
state between steps stays float64) and returns the kernel's (status, count).

Every operation is the textbook one in the kernel's order (the state update's products and
sums, the clip before the quantizer, the read-out's mode order), so float64 inputs give the
kernel's results bit for bit wherever the kernel does not reassociate: everywhere but
LayerNorm, whose kernel sums reassociated (here: in index order).
"""
from __future__ import annotations

import math

import numpy as np

from qs4d_np.kernels import stream as k
from reference.quant import round_ref

ROUNDING_NAMES = ("half_even", "half_up", "half_away", "floor")  # by code, as quant.grids.ROUNDING
INV_SQRT2 = 1.0 / math.sqrt(2.0)


def _quantize(w: float, inv: float, zp: float, qmin: float, qmax: float, rounding: int) -> float:
    """(clamp(round(w*inv) + zp, qmin, qmax) - zp) / inv."""
    q = min(max(float(round_ref(np.float64(w * inv), ROUNDING_NAMES[rounding])) + zp, qmin), qmax)
    return (q - zp) / inv


def _norm(x: list[float], kind: int, w: list[float], b: list[float], eps: float) -> list[float]:
    if kind == k.NORM_LAYER:
        H = len(x)
        mu = sum(x) / H
        var = sum((v - mu) * (v - mu) for v in x) / H
        inv = 1.0 / math.sqrt(var + eps)
        return [(v - mu) * inv * w[j] + b[j] for j, v in enumerate(x)]
    if kind == k.NORM_BATCH:
        return [v * w[j] + b[j] for j, v in enumerate(x)]
    return list(x)


def stream_steps(x, enc, ssm, vec, scal, eps, lflags, opts, W, wb, states_in, pool_in, steps0, states_out,
                 pool_out, feat):
    """The kernel's contract (``kernels.stream.stream_steps``), in float64 loops."""
    f = lambda a: np.asarray(a, dtype=np.float64).tolist()  # noqa: E731
    T, B = np.shape(x)[:2]
    L, M, _, H = np.shape(ssm)
    x, enc, ssm, vec, scal, W, wb = f(x), f(enc), f(ssm), f(vec), f(scal), f(W), f(wb)
    pool = f(pool_in)
    # state[l][b][h][n] = [re, im]
    state = [[[[[float(states_in[l][n, b, h].real), float(states_in[l][n, b, h].imag)] for n in range(M)]
                for h in range(H)] for b in range(B)] for l in range(L)]
    act, mixing, norm = int(opts[k.ACTIVATION]), bool(opts[k.MIXING]), int(opts[k.NORM])
    prenorm, residual = bool(opts[k.PRENORM]), bool(opts[k.RESIDUAL])
    feats = []
    for t in range(T):
        if opts[k.ENCODE]:
            if not all(math.isfinite(x[t][b][0]) for b in range(B)):
                return -1, 0
            hs = [[x[t][b][0] * enc[0][j] + enc[1][j] for j in range(H)] for b in range(B)]
        else:
            hs = [list(x[t][b]) for b in range(B)]
        for l in range(L):
            v, s = vec[l], scal[l]
            kind, srule, aquant, arule = (int(c) for c in lflags[l])
            ys = []
            for b in range(B):
                u = _norm(hs[b], norm, v[k.NORM_W], v[k.NORM_B], float(eps[l])) if prenorm else hs[b]
                y = []
                for h in range(H):
                    acc = 0.0
                    for n in range(M):
                        ar, ai, br, bi, cr, ci = (ssm[l][n][c][h] for c in range(6))
                        xr, xi = state[l][b][h][n]
                        wr = (ar * xr - ai * xi) + br * u[h]
                        wi = (ar * xi + ai * xr) + bi * u[h]
                        if kind != k.STATE_FLOAT:
                            wr = min(max(wr, -s[k.CLIP]), s[k.CLIP])
                            wi = min(max(wi, -s[k.CLIP]), s[k.CLIP])
                        if kind == k.STATE_QUANT:
                            wr = _quantize(wr, v[k.STATE_INV_RE][h], 0.0, s[k.STATE_QMIN], s[k.STATE_QMAX], srule)
                            wi = _quantize(wi, v[k.STATE_INV_IM][h], 0.0, s[k.STATE_QMIN], s[k.STATE_QMAX], srule)
                        state[l][b][h][n] = [wr, wi]
                        acc += cr * wr - ci * wi
                    y.append(2.0 * acc + v[k.D][h] * u[h])
                if act == k.ACT_GELU:
                    y = [a * (0.5 * (1.0 + math.erf(a * INV_SQRT2))) for a in y]
                elif act == k.ACT_RELU:
                    y = [max(a, 0.0) for a in y]
                if mixing:
                    z = [sum((y[i] * W[l][i][j] for i in range(H)), 0.0) + wb[l][j] for j in range(2 * H)]
                    y = [z[j] * (1.0 / (1.0 + math.exp(-z[H + j]))) for j in range(H)]
                ys.append(y)
            if aquant:  # the batch's values are checked together, then quantized
                bad = sum(not math.isfinite(a) for y in ys for a in y)
                if bad:
                    return l + 1, bad
                ys = [[_quantize(a, v[k.ACT_INV][h], v[k.ACT_ZP][h], s[k.ACT_QMIN], s[k.ACT_QMAX], arule)
                       for h, a in enumerate(y)] for y in ys]
            for b in range(B):
                z = [ys[b][h] + hs[b][h] for h in range(H)] if residual else ys[b]
                hs[b] = z if prenorm else _norm(z, norm, v[k.NORM_W], v[k.NORM_B], float(eps[l]))
        if opts[k.POOL] == k.POOL_MEAN:
            pool = [[pool[b][h] + hs[b][h] for h in range(H)] for b in range(B)]
            feats.append([[p / (steps0 + t + 1) for p in row] for row in pool])
        else:
            feats.append([list(row) for row in hs])
    feat[...] = feats
    if opts[k.POOL] == k.POOL_MEAN:
        pool_out[...] = pool
    for l in range(L):
        for n in range(M):
            for b in range(B):
                for h in range(H):
                    states_out[l][n, b, h] = complex(*state[l][b][h][n])
    return 0, 0


def stream_steps_pipelined(x, enc, ssm, vec, scal, eps, lflags, opts, W, wb, states_in, pool_in, steps0,
                           states_out, pool_out, feat, stages, chunk):
    """The pipelined kernel's contract: ``stream_steps``'s for any ``stages`` and ``chunk`` (which
    threads run which steps of which layers changes no value)."""
    return stream_steps(x, enc, ssm, vec, scal, eps, lflags, opts, W, wb, states_in, pool_in, steps0, states_out,
                        pool_out, feat)
