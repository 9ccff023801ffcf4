"""Counter-based standard normal numbers for the crossbar's read noise.

Every number is a pure function of (key, row, column): a splitmix64 hash of
the counter feeds a 128-layer ziggurat (Marsaglia & Tsang, 2000), using the
hash's top 32 bits as the signed abscissa, its low 7 bits as the layer and
bits 7..30 as the wedge uniform, so the three never share bits. The ~3% of
draws outside their layer's inner rectangle go through the wedge or tail
test; a rejection continues a per-cell hash chain.

Why not ``np.random.Generator``: on this project's machine drawing 1024 x 256
float32 normals with it costs about 3x the 1024 x 256 x 256 sgemm they perturb,
and Numba's own ``np.random`` inside ``prange`` uses per-thread streams, so its
numbers would depend on the thread count. A counter-based draw is parallel,
cheap, identical for any thread count, and lets bound management redraw for
a subset of rows without disturbing the others.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S7, _S11, _S27, _S30, _S31, _S32 = (np.uint64(s) for s in (7, 11, 27, 30, 31, 32))
_LOW7 = np.uint64(127)
_BITS24 = np.uint64(0xFFFFFF)
# right end of the ziggurat's base layer and the common area of every layer
ZIG_R = 3.442619855899
ZIG_V = 9.91256303526217e-3


def ziggurat_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k, w, f) for 128 layers: integer acceptance bounds, abscissa scales, densities."""
    m1 = 2.0 ** 31
    k = np.zeros(128)
    w = np.zeros(128)
    f = np.zeros(128)
    dn = tn = ZIG_R
    q = ZIG_V / np.exp(-0.5 * dn * dn)
    k[0] = dn / q * m1
    w[0] = q / m1
    w[127] = dn / m1
    f[0] = 1.0
    f[127] = np.exp(-0.5 * dn * dn)
    for i in range(126, 0, -1):
        dn = np.sqrt(-2.0 * np.log(ZIG_V / dn + np.exp(-0.5 * dn * dn)))
        k[i + 1] = dn / tn * m1
        tn = dn
        f[i] = np.exp(-0.5 * dn * dn)
        w[i] = dn / m1
    return k.astype(np.int64), w, f


ZIG_K, ZIG_W, ZIG_F = ziggurat_tables()


@njit(cache=True, inline="always")
def mix64(z):
    """splitmix64's finalizer: a bijective 64-bit hash."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True, inline="always")
def row_key(key, row):
    """The key of one row's stream (row: a non-negative integer)."""
    return mix64(key ^ (np.uint64(row) * GOLDEN))


@njit(cache=True)
def _gaussian_slow(h, k, w, f):
    """Ziggurat rejection path, continuing the cell's hash chain from ``h``."""
    while True:
        hz = np.int64(h >> _S32) - 2147483648
        iz = np.int64(h & _LOW7)
        x = hz * w[iz]
        if abs(hz) < k[iz]:
            return x
        if iz == 0:
            # tail beyond ZIG_R (Marsaglia's exponential-majorant sampler)
            while True:
                h = mix64(h + GOLDEN)
                u1 = (np.float64(h >> _S11) + 0.5) * 2.0 ** -53
                h = mix64(h + GOLDEN)
                u2 = (np.float64(h >> _S11) + 0.5) * 2.0 ** -53
                xt = -np.log(u1) / ZIG_R
                y = -np.log(u2)
                if y + y >= xt * xt:
                    return ZIG_R + xt if hz > 0 else -ZIG_R - xt
        u = np.float64((h >> _S7) & _BITS24) * 2.0 ** -24
        if f[iz] + u * (f[iz - 1] - f[iz]) < np.exp(-0.5 * x * x):
            return x
        h = mix64(h + GOLDEN)


@njit(cache=True)
def fill_row_normals(rkey, out, hashes):
    """out[i] = the standard normal number of column i in the row stream ``rkey``.

    ``hashes``: a uint64 scratch buffer at least as long as ``out``. Hashing
    every column first and running the ziggurat in a second pass lets the hash
    loop vectorize; on this project's machine it is an order of magnitude
    faster than one fused per-column call.
    """
    n = out.shape[0]
    for i in range(n):
        hashes[i] = mix64(rkey + np.uint64(i) * GOLDEN)
    for i in range(n):
        h = hashes[i]
        hz = np.int64(h >> _S32) - 2147483648
        iz = np.int64(h & _LOW7)
        if abs(hz) < ZIG_K[iz]:
            out[i] = hz * ZIG_W[iz]
        else:
            out[i] = _gaussian_slow(h, ZIG_K, ZIG_W, ZIG_F)


@njit(cache=True, parallel=True)
def _fill(key, rows, out):
    for b in prange(rows.shape[0]):
        fill_row_normals(row_key(key, rows[b]), out[b], np.empty(out.shape[1], dtype=np.uint64))


def gaussian_block(key: int, rows: np.ndarray, n_cols: int) -> np.ndarray:
    """Standard normals shaped (len(rows), n_cols): entry (b, i) is the number of (key, rows[b], i)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if rows.ndim != 1 or (rows.size and rows.min() < 0):
        raise ValueError(f"rows must be a 1-d array of non-negative row indices, got shape {rows.shape}")
    out = np.empty((rows.size, int(n_cols)), dtype=np.float64)
    _fill(np.uint64(key), rows, out)
    return out


def derive_key(key: int, *counters: int) -> np.uint64:
    """A sub-stream key from a key and counters (tile index, bound-management round, ...)."""
    mask = (1 << 64) - 1
    z = int(key) & mask
    for c in counters:
        z = int(mix64(np.uint64(z ^ (((int(c) + 1) * int(GOLDEN)) & mask))))
    return np.uint64(z)
