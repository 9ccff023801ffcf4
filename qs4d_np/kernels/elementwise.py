"""Fused elementwise Numba kernels: GELU, bias + GLU, channel-mask apply.

Each kernel makes one pass over its data and writes into a
caller-provided ``out`` array, so an op costs one read and one write of its
activations instead of a chain of NumPy temporaries. Arrays must be
C-contiguous; the ops in ``qs4d_np.core`` reshape (B, L, C) activations into
2-D (rows, C) views before calling. Column sums (bias gradients) are
accumulated in float64 per fixed block of ``ROW_BLOCK`` rows and the blocks
are then added, so the result does not depend on the number of threads.

The transcendental functions go through ``normal_cdf``, ``normal_pdf`` and
``sigmoid``, which pick an implementation by the argument's type when a
kernel is compiled: float64 data use libm's erf/exp, float32 data use
branch-free float32 approximations (``exp_f32``, a fitted erfc) that LLVM
turns into SIMD code. libm calls are scalar and cost ~3-5x more per value
than the rest of a float32 kernel (GELU forward at (64, 784, 128) went from
~60 ms to ~10 ms on 2 cores); the approximations stay within a few float32
ulp of the exact values (bounds in ``tests/test_ops_kernels.py``).

float64 twins of every kernel live in ``reference/ops.py``.
"""
from __future__ import annotations

import functools
import math
import types
from typing import Callable

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba import types as nbtypes
from numba.extending import intrinsic, overload

# Rows per partial-sum block in column reductions (fixed for determinism).
ROW_BLOCK = 1024
# Below this many entries a kernel runs on one thread: waking the thread pool
# costs more than the work, and on a shared machine a descheduled worker stalls
# the whole parallel region.
PARALLEL_MIN_SIZE = 1 << 16


def row_kernel(fn: Callable | None = None, *, reassociate: bool = False) -> Callable:
    """Compile ``fn`` twice, with ``parallel=True`` and serially (``prange`` then acts
    as ``range``), and call the parallel one when the first argument has at least
    ``PARALLEL_MIN_SIZE`` entries. Both stay reachable as ``.parallel`` / ``.serial``
    (the tests check each). The serial copy gets its own name so that Numba's
    on-disk cache keeps the two compilations apart.

    Kernels use NumPy's error model: Python's raises ZeroDivisionError, and
    that check on every float division keeps LLVM from vectorizing a loop
    (the float32 GELU forward ran ~9x slower). No kernel here divides by a
    value that can be zero for checked inputs.

    ``reassociate=True`` (``@row_kernel(reassociate=True)``) lets LLVM reorder
    sums (fast-math flag ``reassoc`` only) so reductions inside a row
    vectorize; the order is fixed at compile time, so results still do not
    depend on the thread count. Only for kernels that are not bit-exact.
    """
    if fn is None:
        return functools.partial(row_kernel, reassociate=reassociate)
    serial_fn = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                   fn.__defaults__, fn.__closure__)
    serial_fn.__qualname__ = fn.__qualname__ + "_serial"
    options = dict(cache=True, error_model="numpy", fastmath={"reassoc"} if reassociate else False)
    parallel = njit(parallel=True, **options)(fn)
    serial = njit(**options)(serial_fn)

    @functools.wraps(fn)
    def dispatch(*args):
        return (parallel if args[0].size >= PARALLEL_MIN_SIZE else serial)(*args)

    dispatch.parallel = parallel
    dispatch.serial = serial
    return dispatch


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# -- float32 approximations -------------------------------------------------
_F32_INV_SQRT2 = np.float32(_INV_SQRT2)
_F32_INV_SQRT_2PI = np.float32(_INV_SQRT_2PI)
_F32_LOG2E = np.float32(1.0 / math.log(2.0))
# ln 2 split so that k * _F32_LN2_HI is exact for |k| < 2^11 (Cody-Waite reduction)
_F32_LN2_HI = np.float32(0.693359375)
_F32_LN2_LO = np.float32(math.log(2.0) - 0.693359375)
# exp's argument range where float32 results are normal numbers
_F32_EXP_MIN = np.float32(-87.0)
_F32_EXP_MAX = np.float32(88.0)
# Taylor coefficients 1/k! of e^r, highest first; |r| <= ln2/2 keeps the
# truncation error below 2e-8 relative.
_EXP_COEFS = tuple(np.float32(1.0 / math.factorial(k)) for k in range(7, -1, -1))
# erfc(a) = t * exp(-a^2 + P(t)), t = 1/(1 + a/2), a >= 0: P is a degree-9
# Chebyshev least-squares fit (ours) of log(erfcx(a)/t) for a in [0, 10]; max
# error of P 7e-8 (float32 coefficients), i.e. a 7e-8 relative error of erfc
# before float32 rounding. Highest degree first.
_ERFC_COEFS = tuple(np.float32(c) for c in (
    0.144930214, -0.680827177, 1.15673376, -0.696251896, -0.0802804341,
    0.00126758732, 0.0346027997, 0.386640412, 0.998632783, -1.265448))


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret an int32's bits as a float32 (LLVM bitcast, vectorizable)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return nbtypes.float32(nbtypes.int32), codegen


@njit(cache=True, error_model="numpy")
def exp_f32(y):
    """e^y for float32 y (~1e-7 relative error); clamped to [e^-87, e^88].

    e^y = 2^k * e^r with k = round(y / ln 2) and |r| <= ln2/2; 2^k is built
    from its exponent bits, e^r from a polynomial.
    """
    y = min(max(y, _F32_EXP_MIN), _F32_EXP_MAX)
    k = np.floor(y * _F32_LOG2E + np.float32(0.5))
    r = (y - k * _F32_LN2_HI) - k * _F32_LN2_LO
    p = np.float32(0.0)
    for c in _EXP_COEFS:
        p = p * r + c
    return p * _float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


@njit(cache=True, error_model="numpy")
def _half_erfc_f32(x):
    """0.5 * erfc(|x| / sqrt(2)) = Phi(-|x|) for float32 x, relative error a few ulp for |x| < 6."""
    a = abs(x) * _F32_INV_SQRT2
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.5) * a)
    p = np.float32(0.0)
    for c in _ERFC_COEFS:
        p = p * t + c
    return np.float32(0.5) * t * exp_f32(p - a * a)


# -- scalar functions dispatched on the argument's type ---------------------
def normal_cdf(x):
    """Phi(x), the standard normal CDF (Numba only)."""
    raise NotImplementedError("normal_cdf is compiled by Numba only")


def normal_pdf(x):
    """phi(x) = exp(-x^2/2) / sqrt(2 pi) (Numba only)."""
    raise NotImplementedError("normal_pdf is compiled by Numba only")


def sigmoid(x):
    """1 / (1 + exp(-x)) (Numba only)."""
    raise NotImplementedError("sigmoid is compiled by Numba only")


@overload(normal_cdf)
def _normal_cdf(x):
    if x == nbtypes.float32:
        def impl(x):
            h = _half_erfc_f32(x)
            return h if x < 0 else np.float32(1.0) - h
        return impl
    return lambda x: 0.5 * (1.0 + math.erf(x * _INV_SQRT2))


@overload(normal_pdf)
def _normal_pdf(x):
    if x == nbtypes.float32:
        return lambda x: _F32_INV_SQRT_2PI * exp_f32(np.float32(-0.5) * x * x)
    return lambda x: _INV_SQRT_2PI * math.exp(-0.5 * x * x)


@overload(sigmoid)
def _sigmoid(x):
    if x == nbtypes.float32:
        return lambda x: np.float32(1.0) / (np.float32(1.0) + exp_f32(-x))
    return lambda x: 1.0 / (1.0 + math.exp(-x))


@row_kernel
def gelu_forward(x, out, cdf):
    """out = x * Phi(x) (exact erf GELU); also stores Phi(x) in ``cdf``. Flat 1-D arrays.

    Keeping Phi spares the backward pass a second erf, the costliest part of GELU.
    """
    for i in prange(x.size):
        v = x[i]
        phi = normal_cdf(v)
        cdf[i] = phi
        out[i] = v * phi


@row_kernel
def gelu_backward(x, cdf, grad, out):
    """out = grad * (Phi(x) + x * phi(x)), the exact GELU derivative, with Phi from the forward."""
    for i in prange(x.size):
        v = x[i]
        out[i] = grad[i] * (cdf[i] + v * normal_pdf(v))


@row_kernel
def glu_forward(z, bias, out, gate):
    """GLU of ``z + bias`` along the last axis.

    z (rows, 2C), bias (2C,), out and gate (rows, C):
    gate = sigmoid(z[:, C:] + bias[C:]), out = (z[:, :C] + bias[:C]) * gate.
    The gate is kept for the backward pass (it saves an exp per entry there).
    """
    rows, c2 = z.shape
    c = c2 // 2
    for r in prange(rows):
        for j in range(c):
            s = sigmoid(z[r, c + j] + bias[c + j])
            gate[r, j] = s
            out[r, j] = (z[r, j] + bias[j]) * s


@row_kernel
def glu_backward(z, bias, gate, grad, dz):
    """Backward of ``glu_forward``: fills dz (rows, 2C), returns dbias (2C,) float64.

    With a = z_a + bias_a and s = gate: dz_a = grad * s,
    dz_g = grad * a * s * (1 - s); dbias = column sums of dz.
    """
    rows, c2 = z.shape
    c = c2 // 2
    nblocks = max(1, (rows + ROW_BLOCK - 1) // ROW_BLOCK)
    partial = np.zeros((nblocks, c2))
    for blk in prange(nblocks):
        stop = min(rows, (blk + 1) * ROW_BLOCK)
        for r in range(blk * ROW_BLOCK, stop):
            for j in range(c):
                s = gate[r, j]
                da = grad[r, j] * s
                dg = grad[r, j] * (z[r, j] + bias[j]) * s * (1.0 - s)
                dz[r, j] = da
                dz[r, c + j] = dg
                partial[blk, j] += da
                partial[blk, c + j] += dg
    return partial.sum(axis=0)


@row_kernel
def channel_mask_apply(x, mask, out):
    """out[b, l, h] = x[b, l, h] * mask[b, h]: a (batch, channel) mask shared over time."""
    batch, length, channels = x.shape
    for b in prange(batch):
        for t in range(length):
            for h in range(channels):
                out[b, t, h] = x[b, t, h] * mask[b, h]
