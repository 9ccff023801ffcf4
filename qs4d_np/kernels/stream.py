"""The frozen S4D model's streaming step, fused: every layer of T time steps in one Numba call.

``stream_steps`` runs encoder (d_input = 1) -> n_layers blocks -> pooling for T time steps
of a batch and returns the pooled features after every step; the caller applies the decoder
(a BLAS product, see below). Everything arrives packed in plain arrays, one slice per layer
(``qs4d_np.models.stream_pack`` builds them from a frozen ``S4DModelStream``); L = n_layers,
B = batch, H = d_model, M = d_state/2, all float arrays in the layer dtype unless stated:

* ``x`` (T, B, 1) the raw input when ``opts[ENCODE]`` (the encoder is then ``enc`` (2, H):
  weight row, bias), else (T, B, H) the encoder's output, computed by the caller;
* ``ssm`` (L, M, 6, H): per mode the real and imaginary rows of Abar, Bbar, C (one
  contiguous 6-row block per mode: one memory stream);
* ``vec`` (L, VEC_ROWS, H): per channel D, the state's codes per unit (real, imaginary
  part), the act quantizer's codes per unit and zero point, the norm's weight and bias
  (BatchNorm: its evaluation scale and shift, ``BatchNorm.eval_affine``);
* ``scal`` (L, SCAL_COLS): the state clip (inf: none) and the state's and act's code bounds;
* ``eps`` (L,) float64: LayerNorm's eps; ``lflags`` (L, LFLAG_COLS) int64: the state kind
  (``STATE_FLOAT``: no state target, no clip; ``STATE_CLIP``: a clip only; ``STATE_QUANT``),
  its rounding rule, whether the act quantizer is on and its rounding rule
  (``quant.grids.ROUNDING`` codes);
* ``opts`` (OPT_COUNT,) int64: ENCODE, ACTIVATION (``ACT_*``), MIXING (0/1), NORM (``NORM_*``),
  PRENORM, RESIDUAL, POOL (``POOL_*``), the same for every layer;
* ``W`` (L, H, 2H), ``wb`` (L, 2H): the mixing weight (quantized where the model quantizes
  it) and bias; zero-size without mixing;
* ``states_in``: a tuple of L (M, B, H) complex C-contiguous arrays, the state before step 0
  (read only); ``states_out`` (L, M, B, H) complex: the state after the last step;
  ``pool_in``, ``pool_out`` (B, H) float64: the running sum of the last block's outputs
  (mean pooling; zero-size for last pooling); ``steps0``: the steps taken before;
* ``feat`` (T, B, H): filled with the pooled features after every step.

Returns (status, count): (0, 0) on success; (-1, 0) when ``x`` holds a NaN or inf (encoder
input, checked only when ``opts[ENCODE]``); (l + 1, n) when the act quantizer of layer l met
n non-finite values in the batch (the Python path raises for both; outputs are then
unspecified).

The arithmetic is the evaluation forward's, operation by operation, in the layer dtype:

* encoder: x*w, then + bias (BLAS's one-term product; with d_input > 1 the BLAS sum's
  rounding depends on its kernel, so the caller runs that product with NumPy);
* the SSM core in ``CoreStep``'s order (the scan kernel's): v = (ar*xr - ai*xi) + br*u,
  vi = (ar*xi + ai*xr) + bi*u; with a state target or a clip (``kernels.quant_scan``'s
  path) clip to [-clip, clip] and quantize clamp(round(w*inv), qmin, qmax)/inv by the
  rounding rule (``STATE_CLIP`` skips the quantizer), read-out terms cr*xr - ci*xi in the
  dtype added into a float64 accumulator in mode order 0..M-1, y = 2*acc + D*u rounded once
  to the dtype: bit for bit the forward's; a float state (the forward's reassociated float
  scan, ``CoreStep``'s complex path) sums the read-out in the dtype, in mode order;
* GELU (``elementwise.normal_cdf``, the exact-erf form of the forward's kernel, its float32
  approximation in float32), ReLU; the mixing product summed over the H inputs in order
  k = 0..H-1 (BLAS orders and fuses its sums differently: a few ulp, absorbed by a quantized
  act or within the float stream's tolerance), bias + GLU as ``elementwise.glu_forward``;
* the act quantizer as ``kernels.fake_quant``: clamp(round(v*inv) + zp, qmin, qmax), then
  (q - zp)/inv; residual z + x; LayerNorm by ``norm.layernorm_forward`` itself (its sums are
  reassociated, so only the same compiled kernel gives the same bits), BatchNorm as
  ``norm.column_affine`` (x*scale + shift);
* mean pooling: the float64 sum + the step's output, divided by the step count, rounded.

No fastmath (the quantized path is bit-exact) and no parallel loop inside a step: at batch 1
to 16 a step is ~30-1000 us of work, and a parallel region per layer would cost thread
wake-ups several times per step. Many steps (``stream_steps_pipelined``) instead split the
layers, not the step: each thread runs a contiguous group of layers over a chunk of steps
while the next thread runs its layers on the previous chunk, one parallel region per chunk
(measured ~1.3-1.7x the serial kernel over 784 steps of s4d-example on 2 threads). Each hot loop is its own compiled
function with its flags as literals (``_core_body``'s copies), runs over the fast channel
axis and vectorizes; the helpers are not inlined into ``stream_steps`` (inlined, the core's
loops measured several times slower). The float64 loop twin is ``reference/stream.py``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from qs4d_np.kernels.elementwise import normal_cdf, sigmoid
from qs4d_np.kernels.fake_quant import round_code
from qs4d_np.kernels.norm import layernorm_forward

# rows of ``vec``
D, STATE_INV_RE, STATE_INV_IM, ACT_INV, ACT_ZP, NORM_W, NORM_B = range(7)
VEC_ROWS = 7
# columns of ``scal``
CLIP, STATE_QMIN, STATE_QMAX, ACT_QMIN, ACT_QMAX = range(5)
SCAL_COLS = 5
# columns of ``lflags`` and the state kinds
STATE_KIND, STATE_ROUNDING, ACT_QUANT, ACT_ROUNDING = range(4)
LFLAG_COLS = 4
STATE_FLOAT, STATE_CLIP, STATE_QUANT = range(3)
# entries of ``opts`` and their values
ENCODE, ACTIVATION, MIXING, NORM, PRENORM, RESIDUAL, POOL = range(7)
OPT_COUNT = 7
ACT_NONE, ACT_GELU, ACT_RELU = range(3)
NORM_NONE, NORM_LAYER, NORM_BATCH = range(3)
POOL_MEAN, POOL_LAST = range(2)

# The compiled serial LayerNorm the forward runs at stream sizes: called, not re-implemented,
# because its reassociated row sums fix their order only inside that compiled kernel.
_layernorm = layernorm_forward.serial


_FLAGS = dict(cache=True, error_model="numpy")  # no ZeroDivisionError check per division: loops vectorize


@njit(inline="always", **_FLAGS)
def _core_body(src, dst, p, u, v, s, y, acc, kind, mode):
    """One layer's SSM core on the batch: src, dst (M, B, H) complex (distinct arrays),
    p (M, 6, H) planes, u (B, H) the layer input, v (VEC_ROWS, H), s (SCAL_COLS,); y (B, H) <-
    the core output (D*u included). acc (B, H) scratch: float64 for the quantized-scan path,
    the dtype for a float state (``CoreStep``'s complex path sums in the dtype). ``kind``,
    ``mode``: literals (one compiled copy each, below)."""
    M, B, H = dst.shape
    clip, qmin, qmax = s[CLIP], s[STATE_QMIN], s[STATE_QMAX]
    inv_r, inv_i = v[STATE_INV_RE], v[STATE_INV_IM]
    acc[:, :] = 0
    for n in range(M):  # the read-out adds each mode's term in order 0..M-1
        ar, ai, br, bi, cr, ci = p[n, 0], p[n, 1], p[n, 2], p[n, 3], p[n, 4], p[n, 5]
        for b in range(B):
            x_old, x_new, ub, ab = src[n, b], dst[n, b], u[b], acc[b]
            # the update and the read-out in separate loops over the row (it stays in L1): the
            # update then vectorizes over 8 float32 lanes, not the 4 of the float64 sum
            # (measured ~1.3x faster at batch 1, ~1.5-2x at batch 16)
            for j in range(H):
                x = x_old[j]
                xr, xi, ut = x.real, x.imag, ub[j]
                wr = (ar[j] * xr - ai[j] * xi) + br[j] * ut
                wi = (ar[j] * xi + ai[j] * xr) + bi[j] * ut
                if kind != STATE_FLOAT:
                    wr = min(max(wr, -clip), clip)
                    wi = min(max(wi, -clip), clip)
                    if kind == STATE_QUANT:
                        wr = min(max(round_code(wr * inv_r[j], mode), qmin), qmax) / inv_r[j]
                        wi = min(max(round_code(wi * inv_i[j], mode), qmin), qmax) / inv_i[j]
                x_new[j] = complex(wr, wi)
            for j in range(H):
                x = x_new[j]
                ab[j] += cr[j] * x.real - ci[j] * x.imag  # the term in the dtype, added in acc's
    two, d = acc.dtype.type(2), v[D]
    for b in range(B):
        for j in range(H):
            y[b, j] = two * acc[b, j] + d[j] * u[b, j]


# ``_core_body`` compiled with its flags as literals, one function each: the inner loop then has
# no branch on them and vectorizes (the quantized one ~3x faster than with the rule as a variable;
# inlined into the big kernel instead, the loops measured several times slower).
@njit(**_FLAGS)
def _core_float(src, dst, p, u, v, s, y):
    _core_body(src, dst, p, u, v, s, y, np.empty_like(y), STATE_FLOAT, 0)


@njit(**_FLAGS)
def _core_clip(src, dst, p, u, v, s, y, acc):
    _core_body(src, dst, p, u, v, s, y, acc, STATE_CLIP, 0)


@njit(**_FLAGS)
def _core_quant_even(src, dst, p, u, v, s, y, acc):
    _core_body(src, dst, p, u, v, s, y, acc, STATE_QUANT, 0)


@njit(**_FLAGS)
def _core_quant(src, dst, p, u, v, s, y, acc, mode):
    _core_body(src, dst, p, u, v, s, y, acc, STATE_QUANT, mode)


@njit(**_FLAGS)
def _core(src, dst, p, u, v, s, kind, mode, y, acc):
    """``_core_body`` for the layer's state kind and rounding rule; acc (B, H) float64 scratch."""
    if kind == STATE_FLOAT:
        _core_float(src, dst, p, u, v, s, y)
    elif kind == STATE_CLIP:
        _core_clip(src, dst, p, u, v, s, y, acc)
    elif mode == 0:
        _core_quant_even(src, dst, p, u, v, s, y, acc)
    else:
        _core_quant(src, dst, p, u, v, s, y, acc, mode)


@njit(inline="always", **_FLAGS)
def _act_quant_body(y, inv, zp, qmin, qmax, mode):
    B, H = y.shape
    for b in range(B):
        for j in range(H):
            q = min(max(round_code(y[b, j] * inv[j], mode) + zp[j], qmin), qmax)
            y[b, j] = (q - zp[j]) / inv[j]


@njit(**_FLAGS)
def _act_quant_even(y, inv, zp, qmin, qmax):
    _act_quant_body(y, inv, zp, qmin, qmax, 0)


@njit(**_FLAGS)
def _act_quant(y, inv, zp, qmin, qmax, mode):
    """Fake-quantize y (B, H) in place, per channel (a per-tensor scale comes repeated)."""
    if mode == 0:
        _act_quant_even(y, inv, zp, qmin, qmax)
    else:
        _act_quant_body(y, inv, zp, qmin, qmax, mode)


@njit(**_FLAGS)
def _count_nonfinite(y):
    bad = 0
    for b in range(y.shape[0]):
        for j in range(y.shape[1]):
            bad += not abs(y[b, j]) < np.inf
    return bad


@njit(**_FLAGS)
def _gelu(y):
    for b in range(y.shape[0]):
        for j in range(y.shape[1]):
            a = y[b, j]
            y[b, j] = a * normal_cdf(a)


@njit(**_FLAGS)
def _relu(y):
    zero = y.dtype.type(0)
    for b in range(y.shape[0]):
        for j in range(y.shape[1]):
            y[b, j] = np.maximum(y[b, j], zero)  # NaN-propagating, as the forward's


@njit(**_FLAGS)
def _norm(x, out, kind, w, bias, eps, mean, rstd):
    """out (B, H) = the norm of x (B, H): LayerNorm's own kernel, or BatchNorm's affine map."""
    if kind == NORM_LAYER:
        _layernorm(x, w, bias, eps, out, mean, rstd)
    else:
        B, H = x.shape
        for b in range(B):
            for j in range(H):
                out[b, j] = x[b, j] * w[j] + bias[j]


@njit(**_FLAGS)
def _mix(y, W, wb, z, out):
    """out (B, H) = GLU(y @ W + wb) for y (B, H), W (H, 2H); z (B, 2H) scratch. Each output adds
    the H inputs' terms in order k = 0..H-1, eight per pass over z (the same sums, an eighth of
    z's loads and stores: measured ~1.2x faster at batch 1, ~1.8x at batch 16)."""
    B, H = y.shape
    N = W.shape[1]
    z[:, :] = 0
    k = 0
    while k + 8 <= H:
        w0, w1, w2, w3, w4, w5, w6, w7 = W[k], W[k + 1], W[k + 2], W[k + 3], W[k + 4], W[k + 5], W[k + 6], W[k + 7]
        for b in range(B):
            yb, zb = y[b], z[b]
            a0, a1, a2, a3, a4, a5, a6, a7 = yb[k], yb[k + 1], yb[k + 2], yb[k + 3], yb[k + 4], yb[k + 5], yb[k + 6], yb[k + 7]
            for j in range(N):
                zb[j] = (((((((zb[j] + a0 * w0[j]) + a1 * w1[j]) + a2 * w2[j]) + a3 * w3[j]) + a4 * w4[j])
                          + a5 * w5[j]) + a6 * w6[j]) + a7 * w7[j]
        k += 8
    for k in range(k, H):
        for b in range(B):
            a = y[b, k]
            for j in range(N):
                z[b, j] += a * W[k, j]
    for b in range(B):
        for j in range(H):
            s = sigmoid(z[b, H + j] + wb[H + j])
            out[b, j] = (z[b, j] + wb[j]) * s


@njit(**_FLAGS)
def _stage(x, enc, ssm, vec, scal, eps, lflags, opts, W, wb, states_in, pool_in, steps0, states_out, other,
           pool_out, feat, h_in, h_out, t0, t1, l0, l1):
    """Steps t0..t1-1 of layers l0..l1-1: the encoder first when l0 = 0 (else the input is h_in[t]),
    the pooling last when l1 = L (else the output goes to h_out[t]); h_in, h_out (T, B, H). Step t
    reads layer l's state from states_in (t = 0) or the buffer step t-1 wrote and writes the other
    of states_out / other (the last step: states_out), so any split of the steps and layers, run
    in step order per layer, computes what one pass does."""
    T, B = x.shape[0], x.shape[1]
    L, M, _, H = ssm.shape
    h = np.empty_like(feat[0])   # the block input / output
    hn = np.empty_like(h)        # the next block's input
    un = np.empty_like(h)        # the prenormed input
    y = np.empty_like(h)         # the layer output
    z = np.empty((B, 2 * H), dtype=h.dtype)
    acc = np.empty((B, H))
    mean = np.empty(B)
    rstd = np.empty(B)
    act, mixing, norm = opts[ACTIVATION], opts[MIXING], opts[NORM]
    prenorm, residual = opts[PRENORM], opts[RESIDUAL]
    for t in range(t0, t1):
        last = (T - 1 - t) % 2 == 0
        new, old = (states_out, other) if last else (other, states_out)
        if l0 > 0:
            h[:, :] = h_in[t]
        elif opts[ENCODE]:
            for b in range(B):
                xt = x[t, b, 0]
                if not abs(xt) < np.inf:
                    return -1, 0
                for j in range(H):
                    h[b, j] = xt * enc[0, j] + enc[1, j]
        else:
            h[:, :] = x[t]
        for l in range(l0, l1):
            v = vec[l]
            u = h
            if prenorm and norm != NORM_NONE:
                _norm(h, un, norm, v[NORM_W], v[NORM_B], eps[l], mean, rstd)
                u = un
            src = states_in[l] if t == 0 else old[l]
            _core(src, new[l], ssm[l], u, v, scal[l], lflags[l, STATE_KIND], lflags[l, STATE_ROUNDING], y, acc)
            if act == ACT_GELU:
                _gelu(y)
            elif act == ACT_RELU:
                _relu(y)
            if mixing:
                _mix(y, W[l], wb[l], z, un)  # un is free again: the core has read u
                y[:, :] = un
            if lflags[l, ACT_QUANT]:
                bad = _count_nonfinite(y)
                if bad:
                    return l + 1, bad
                s = scal[l]
                _act_quant(y, v[ACT_INV], v[ACT_ZP], s[ACT_QMIN], s[ACT_QMAX], lflags[l, ACT_ROUNDING])
            if residual:
                for b in range(B):
                    for j in range(H):
                        y[b, j] = y[b, j] + h[b, j]
            if not prenorm and norm != NORM_NONE:
                _norm(y, hn, norm, v[NORM_W], v[NORM_B], eps[l], mean, rstd)
            else:
                hn[:, :] = y
            h, hn = hn, h
        if l1 < L:
            h_out[t] = h
        elif opts[POOL] == POOL_MEAN:
            sums = pool_in if t == 0 else pool_out
            count = np.float64(steps0 + t + 1)
            for b in range(B):
                for j in range(H):
                    pool_out[b, j] = sums[b, j] + h[b, j]
                    feat[t, b, j] = pool_out[b, j] / count
        else:
            feat[t] = h
    return 0, 0


@njit(**_FLAGS)
def stream_steps(x, enc, ssm, vec, scal, eps, lflags, opts, W, wb, states_in, pool_in, steps0, states_out,
                 pool_out, feat):
    """T steps of the frozen model on a batch (module docstring: arguments, order, status)."""
    # Steps alternate between states_out and a second buffer, the last one writing states_out: an
    # update in place would fail the vectorized loops' no-overlap check (measured ~1.5x slower)
    other = np.empty_like(states_out) if x.shape[0] > 1 else states_out
    return _stage(x, enc, ssm, vec, scal, eps, lflags, opts, W, wb, states_in, pool_in, steps0, states_out, other,
                  pool_out, feat, feat, feat, 0, x.shape[0], 0, ssm.shape[0])


@njit(parallel=True, **_FLAGS)
def stream_steps_pipelined(x, enc, ssm, vec, scal, eps, lflags, opts, W, wb, states_in, pool_in, steps0,
                           states_out, pool_out, feat, stages, chunk):
    """``stream_steps`` with its layers split into ``stages`` contiguous groups, one thread each,
    pipelined over chunks of ``chunk`` steps: while stage s runs chunk c, stage s + 1 runs chunk
    c - 1 on what stage s handed it. The same operations per layer in the same step order, so
    the same bits as ``stream_steps``; a chunk's handover is one parallel region (a few us,
    shared by its steps), and each thread reads only its stage's weights. On a failure the
    steps are run again serially, which returns the first failure in step, then layer order."""
    T, B = x.shape[0], x.shape[1]
    L, H = ssm.shape[0], ssm.shape[3]
    S = min(stages, L)
    if S < 2 or chunk < 1 or T <= chunk:
        return stream_steps(x, enc, ssm, vec, scal, eps, lflags, opts, W, wb, states_in, pool_in, steps0,
                            states_out, pool_out, feat)
    other = np.empty_like(states_out)
    handover = np.empty((S - 1, T, B, H), feat.dtype)  # stage s's outputs, stage s + 1's inputs
    status = np.zeros((S, 2), np.int64)
    n_chunks = (T + chunk - 1) // chunk
    for c_first in range(n_chunks + S - 1):
        for s_ in prange(S):
            s = np.int64(s_)  # prange's index is unsigned: mixed with signed ints it would be a float
            c = c_first - s
            if 0 <= c < n_chunks:
                h_in = handover[max(s - 1, 0)]
                h_out = handover[min(s, S - 2)]
                status[s, 0], status[s, 1] = _stage(
                    x, enc, ssm, vec, scal, eps, lflags, opts, W, wb, states_in, pool_in, steps0, states_out,
                    other, pool_out, feat, h_in, h_out, c * chunk, min(T, (c + 1) * chunk), s * L // S,
                    (s + 1) * L // S)
        if status[:, 0].any():
            return stream_steps(x, enc, ssm, vec, scal, eps, lflags, opts, W, wb, states_in, pool_in, steps0,
                                states_out, pool_out, feat)
    return 0, 0
