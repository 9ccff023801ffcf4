"""Plain float64 twin of the crossbar simulation (qs4d_np.hardware), loop by loop.

Given the same seed it consumes the NumPy Generator exactly as
``qs4d_np.hardware.crossbar.CrossbarArray`` does (programming noise shaped
(2, out, in), then one 64-bit key per noisy MVM) and recomputes the counter
based read noise in pure Python, so the fast kernels can be compared number
for number. Also here: the integer computation a noise-free array with
DAC/ADC must equal exactly, and an exact nodal solve of a resistive crossbar
to check the first-order IR-drop model.
"""
from __future__ import annotations

import math

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_R = 3.442619855899
_V = 9.91256303526217e-3


# -- counter-based normals -----------------------------------------------
def mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def derive_key(key: int, *counters: int) -> int:
    z = key & _MASK
    for c in counters:
        z = mix64(z ^ (((c + 1) * _GOLDEN) & _MASK))
    return z


def _tables() -> tuple[list[int], list[float], list[float]]:
    k, w, f = [0.0] * 128, [0.0] * 128, [0.0] * 128
    m1 = 2.0 ** 31
    dn = tn = _R
    q = _V / math.exp(-0.5 * dn * dn)
    k[0], w[0], w[127] = dn / q * m1, q / m1, dn / m1
    f[0], f[127] = 1.0, math.exp(-0.5 * dn * dn)
    for i in range(126, 0, -1):
        dn = math.sqrt(-2.0 * math.log(_V / dn + math.exp(-0.5 * dn * dn)))
        k[i + 1] = dn / tn * m1
        tn = dn
        f[i] = math.exp(-0.5 * dn * dn)
        w[i] = dn / m1
    return [int(v) for v in k], w, f


_K, _W, _F = _tables()


def gaussian(key: int, row: int, col: int) -> float:
    """The standard normal number (key, row, col) of the ziggurat in qs4d_np.hardware.rng."""
    rkey = mix64(key ^ ((row * _GOLDEN) & _MASK))
    h = mix64((rkey + col * _GOLDEN) & _MASK)
    while True:
        hz = (h >> 32) - 2 ** 31
        iz = h & 127
        x = hz * _W[iz]
        if abs(hz) < _K[iz]:
            return x
        if iz == 0:
            while True:
                h = mix64((h + _GOLDEN) & _MASK)
                u1 = ((h >> 11) + 0.5) * 2.0 ** -53
                h = mix64((h + _GOLDEN) & _MASK)
                u2 = ((h >> 11) + 0.5) * 2.0 ** -53
                xt = -math.log(u1) / _R
                y = -math.log(u2)
                if y + y >= xt * xt:
                    return _R + xt if hz > 0 else -_R - xt
        u = ((h >> 7) & 0xFFFFFF) * 2.0 ** -24
        if _F[iz] + u * (_F[iz - 1] - _F[iz]) < math.exp(-0.5 * x * x):
            return x
        h = mix64((h + _GOLDEN) & _MASK)


# -- programming -----------------------------------------------------------
def program(W: np.ndarray, cfg, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(g_pos, g_neg, g_unit, w_absmax): pair conductances in level units after programming noise."""
    out_f, in_f = W.shape
    w_absmax = float(np.max(np.abs(W)))
    if w_absmax == 0:
        w_absmax = 1.0
    g = np.zeros((2, out_f, in_f))
    for i in range(out_f):
        for j in range(in_f):
            w = W[i, j] / w_absmax
            g[0, i, j] = min(max(w, 0.0), 1.0)
            g[1, i, j] = min(max(-w, 0.0), 1.0)
    g_unit = 1.0
    if cfg.g_levels is not None:
        g_unit = 1.0 / (cfg.g_levels - 1)
        g = np.rint(g * (cfg.g_levels - 1))
    if cfg.prog_noise > 0:
        z = rng.standard_normal(g.shape)
        c0, c1, c2 = cfg.pcm_coeffs
        for idx in np.ndindex(g.shape):
            t = g[idx] * g_unit
            if cfg.prog_noise_type == "pcm":
                sigma = cfg.prog_noise / 25.0 * (c0 + c1 * t + c2 * t * t)
            else:
                sigma = cfg.prog_noise
            g[idx] = max(g[idx] + sigma / g_unit * z[idx], 0.0)
    return g[0], g[1], g_unit, w_absmax


def ir_drop_first_order(g_phys: np.ndarray, rho: float) -> np.ndarray:
    """Factors 1 - rho*(c + e) from the double-sum definitions (physical tile (rows, cols))."""
    n, m = g_phys.shape
    factor = np.ones((n, m))
    for j in range(n):
        for i in range(m):
            c = sum(g_phys[j, i2] * (min(i, i2) + 1) for i2 in range(m))
            e = sum(g_phys[j2, i] * (n - max(j, j2)) for j2 in range(n))
            factor[j, i] = 1.0 - rho * (c + e)
    return factor


def ir_drop_exact(g_phys: np.ndarray, v: np.ndarray, rho: float) -> np.ndarray:
    """Column currents of a resistive crossbar by nodal analysis (normalized units).

    Word line j is driven with v[j] left of column 0; bit line i ends in a
    virtual ground below row n-1; every wire segment has conductance 1/rho
    (in units of g_max). Unknowns: word-line node voltages a[j, i] and bit-line
    node voltages b[j, i]. Returns the current into each column's ground.
    """
    n, m = g_phys.shape
    gw = 1.0 / rho
    size = 2 * n * m
    A = np.zeros((size, size))
    rhs = np.zeros(size)

    def a_idx(j, i):
        return j * m + i

    def b_idx(j, i):
        return n * m + j * m + i

    for j in range(n):
        for i in range(m):
            g = g_phys[j, i]
            # KCL at word-line node (j, i): currents out of the node sum to 0
            r = a_idx(j, i)
            A[r, r] += g
            A[r, b_idx(j, i)] -= g
            A[r, r] += gw  # segment towards the driver / previous node
            if i == 0:
                rhs[r] += gw * v[j]
            else:
                A[r, a_idx(j, i - 1)] -= gw
            if i < m - 1:
                A[r, r] += gw
                A[r, a_idx(j, i + 1)] -= gw
            # KCL at bit-line node (j, i)
            r = b_idx(j, i)
            A[r, r] += g
            A[r, a_idx(j, i)] -= g
            A[r, r] += gw  # segment towards the ground / next node
            if j < n - 1:
                A[r, b_idx(j + 1, i)] -= gw
            if j > 0:
                A[r, r] += gw
                A[r, b_idx(j - 1, i)] -= gw
    sol = np.linalg.solve(A, rhs)
    return np.array([gw * sol[b_idx(n - 1, i)] for i in range(m)])


# -- the MVM pipeline --------------------------------------------------------
class ReferenceCrossbar:
    """Float64 twin of CrossbarArray (same seed -> same draws -> same outputs)."""

    def __init__(self, W: np.ndarray, cfg, seed: int) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.g_pos, self.g_neg, self.g_unit, self.w_absmax = program(
            np.asarray(W, dtype=np.float64), cfg, self.rng)
        self.out_f, self.in_f = W.shape
        self.tiles = []
        for r0 in range(0, self.in_f, cfg.tile_rows):
            r1 = min(r0 + cfg.tile_rows, self.in_f)
            for c0 in range(0, self.out_f, cfg.tile_cols):
                c1 = min(c0 + cfg.tile_cols, self.out_f)
                gp = self.g_pos[c0:c1, r0:r1].copy()
                gn = self.g_neg[c0:c1, r0:r1].copy()
                if cfg.ir_drop > 0:
                    phys = np.zeros((r1 - r0, 2 * (c1 - c0)))
                    phys[:, 0::2], phys[:, 1::2] = gp.T * self.g_unit, gn.T * self.g_unit
                    f = ir_drop_first_order(phys, cfg.ir_drop)
                    gp, gn = gp * f[:, 0::2].T, gn * f[:, 1::2].T
                self.tiles.append((r0, r1, c0, c1, gp - gn))
        self.clipped_outputs = 0

    def _dac(self, x_norm: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        out = np.empty_like(x_norm)
        for j, v in enumerate(x_norm):
            if cfg.dac_bits is not None:
                v = min(max(float(np.rint(v / cfg.inp_step)), -cfg.inp_qmax), cfg.inp_qmax)
            elif cfg.inp_bound is not None:
                v = min(max(v, -cfg.inp_bound), cfg.inp_bound)
            out[j] = v
        return out

    def _adc(self, v: float) -> tuple[float, bool]:
        cfg = self.cfg
        if cfg.adc_bits is not None:
            q = float(np.rint(v))
            return min(max(q, -cfg.out_qmax), cfg.out_qmax), abs(q) > cfg.out_qmax
        if cfg.out_bound is not None:
            return min(max(v, -cfg.out_bound), cfg.out_bound), abs(v) > cfg.out_bound
        return v, False

    def mvm(self, x: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        noisy = cfg.out_noise > 0 or cfg.w_noise > 0
        key = int(self.rng.integers(0, 2 ** 63)) if noisy else 0
        y = np.zeros((x.shape[0], self.out_f))
        self.clipped_outputs = 0
        rounds = cfg.bm_max_rounds if cfg.bound_management else 0
        for b in range(x.shape[0]):
            s = 1.0
            if cfg.noise_management == "absmax":
                amax = float(np.max(np.abs(x[b])))
                target = cfg.inp_bound if cfg.inp_bound is not None else 1.0
                s = amax / target if amax > 0 else 1.0
            for t, (r0, r1, c0, c1, G) in enumerate(self.tiles):
                for k in range(rounds + 1):
                    codes = self._dac(x[b].astype(np.float64) / s * 2.0 ** -k)[r0:r1]
                    tkey = derive_key(key, t, k)
                    q = np.zeros(c1 - c0)
                    clipped = 0
                    for i in range(c1 - c0):
                        v = float(np.dot(codes, G[i])) * (cfg.inp_step * self.g_unit / cfg.out_step)
                        if noisy:
                            var = cfg.out_noise ** 2
                            if cfg.w_noise > 0 and cfg.w_noise_type == "additive":
                                var += cfg.w_noise ** 2 * float(np.sum((codes * cfg.inp_step) ** 2))
                            elif cfg.w_noise > 0:
                                var += cfg.w_noise ** 2 * float(np.sum(np.abs(G[i] * self.g_unit)
                                                                       * (codes * cfg.inp_step) ** 2))
                            v += math.sqrt(var) / cfg.out_step * gaussian(tkey, b, i)
                        q[i], hit = self._adc(v)
                        clipped += hit
                    if clipped == 0 or k == rounds:
                        self.clipped_outputs += clipped if k == rounds else 0
                        y[b, c0:c1] += q * (cfg.out_step * self.w_absmax * s) * 2.0 ** k
                        break
        return y


def integer_mvm(W: np.ndarray, x: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray, int]:
    """The integer computation of a noise-free, IR-free array with DAC, levels and ADC.

    DAC codes and conductance levels are int64, the column sums are exact
    int64 dot products, the ADC rounds acc * inp_step * g_unit / out_step half
    to even. Single tile, no bound management. Returns (ADC codes, y, number
    of clipped outputs).
    """
    top = cfg.g_levels - 1
    w_absmax = float(np.max(np.abs(W))) or 1.0
    lev = (np.rint(np.clip(W / w_absmax, 0, 1) * top).astype(np.int64)
           - np.rint(np.clip(-W / w_absmax, 0, 1) * top).astype(np.int64))
    s = np.ones(x.shape[0])
    if cfg.noise_management == "absmax":
        amax = np.max(np.abs(x), axis=1)
        s = np.where(amax > 0, amax / cfg.inp_bound, 1.0)
    codes = np.clip(np.rint(x / s[:, None] / cfg.inp_step), -cfg.inp_qmax, cfg.inp_qmax).astype(np.int64)
    acc = codes @ lev.T
    unclipped = np.rint(acc.astype(np.float64) * (cfg.inp_step * (1.0 / top) / cfg.out_step))
    adc = np.clip(unclipped, -cfg.out_qmax, cfg.out_qmax).astype(np.int64)
    y = adc * (cfg.out_step * w_absmax * s)[:, None]
    return adc, y, int(np.sum(np.abs(unclipped) > cfg.out_qmax))
