"""A simulated memristive crossbar: program a weight matrix once, then run noisy MVMs.

``program(W, config, seed)`` maps W (out, in) to differential-pair conductances
(``qs4d_np.hardware.conductance``), draws the programming noise once, applies
the IR drop and splits the matrix into tiles of at most ``tile_rows`` inputs x
``tile_cols`` outputs. ``CrossbarArray.mvm(x)`` maps x (batch, in) to
y (batch, out) ~ x @ W.T through the aihwkit-like pipeline, per input vector b:

1. noise management: s_b = max_j |x_bj| / inp_bound ("absmax"; 1 for a zero
   row or "none"), x_norm = x_b / s_b. One s_b per vector, shared by all tiles,
   as the digital periphery computes it once.
2. DAC: codes = clamp(rint(x_norm * 2^-k / inp_step), -inp_qmax, inp_qmax),
   k = bound-management round (0 first).
3. per tile: analog product acc = codes @ Gdiff.T, where Gdiff = g+ - g- in
   level units (integers for a noise-free array with ``g_levels``), done by
   BLAS in ``config.dtype``.
4. read noise, fresh at every MVM: v = acc * inp_step * g_unit / out_step +
   sqrt(out_noise^2 + w_noise^2 * q_bi) / out_step * z_bi with z from the
   counter-based generator (``qs4d_np.hardware.rng``) and q_bi = ||x_norm||^2
   ("additive") or sum_j |w_ij| x_norm_j^2 ("proportional"). Values are in ADC
   steps (the ADC's LSB).
5. ADC: q = clamp(rint(v), -out_qmax, out_qmax); an output is "clipped" when
   rint(v) fell outside. Without an ADC but with ``out_bound``, v is clamped to
   +-out_bound.
6. bound management: a (vector, tile) with a clipped output is redone with
   k + 1 (halved input, fresh noise) up to ``bm_max_rounds``; the last round
   is accepted as it is.
7. digital rescale and tile sum: y_b += q * (out_step * w_absmax * s_b) * 2^k.

Reproducibility: the programming noise comes from the array's Generator at
``program``; each noisy ``mvm`` takes one 64-bit key from it, and every read
noise number is a pure function of (key, tile, round, row, output), so the
results do not depend on the thread count nor on which rows were redone.
Noise set to 0 is exactly off: nothing is drawn.

Threads: the row kernels run in parallel chunks only for at least
``PARALLEL_MIN_WORK`` matrix entries (and more than one Numba thread); the
analog product is a BLAS call. On a machine shared with other jobs
``numba.set_num_threads(1)`` (and one BLAS thread) can be much faster.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from qs4d_np.core.checks import check_array
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.conductance import (Conductances, apply_ir_drop, drift_compensation, drift_conductances,
                                          program_conductances)
from qs4d_np.hardware.rng import derive_key, fill_row_normals, row_key

# noise_type codes passed to the kernels
_NOISE_OUT_ONLY, _NOISE_ADDITIVE, _NOISE_PROPORTIONAL = 0, 1, 2
# rows per parallel work item (a work item allocates its scratch buffers once)
_CHUNK = 16
# below this many matrix entries (rows x width) a kernel runs on one thread: a
# parallel region costs tens of microseconds when idle and milliseconds on a
# loaded machine, which would dominate the small-batch MVMs of a recurrence
PARALLEL_MIN_WORK = 1 << 16


@njit(cache=True)
def _encode_rows(lo, hi, x, rows, row_scale, nm_target, factor, step, qmax, bound, codes):
    """Noise-managed DAC codes of x[rows[lo:hi]] * factor into codes[lo:hi].

    nm_target > 0: first set row_scale[r] = max_j |x[r, j]| / nm_target (1 for
    a zero row) -- absmax noise management in the same pass over the rows.
    qmax > 0: quantize to integer codes; qmax == 0: no DAC, clamp to +-bound
    when bound > 0.
    """
    n_in = x.shape[1]
    for b in range(lo, hi):
        r = rows[b]
        if nm_target > 0.0:
            m = 0.0
            for j in range(n_in):
                m = max(m, abs(np.float64(x[r, j])))
            # a zero vector has nothing to scale; 1 keeps its (noise-only) output finite
            row_scale[r] = m / nm_target if m > 0.0 else 1.0
        s = row_scale[r]
        for j in range(n_in):
            v = np.float64(x[r, j]) / s * factor
            limit = bound
            if qmax > 0:
                v = np.rint(v / step)
                limit = qmax
            if limit > 0.0:
                v = min(max(v, -limit), limit)
            codes[b, j] = v


@njit(cache=True)
def _read_out_rows(lo, hi, acc, pacc, codes, r0, r1, rows, noise_type, sig_out2, w_noise2, k_acc, k_noise,
                   qmax, bound, key, accept_clipped, out_scale, gain, factor, y, c0, clipped):
    """Read noise + ADC of rows lo:hi of one tile and one round; accumulates accepted rows into y.

    acc (len(rows), cols): analog sums in level units. pacc: sum_j |Gdiff_ij|
    codes_j^2 ("proportional" noise only). k_acc: level units -> ADC steps;
    k_noise: normalized std -> ADC steps, both already including the DAC
    step. qmax > 0: ADC codes up to qmax; otherwise clamp at +-bound if
    bound > 0. ``gain`` / ``factor`` (all outputs): each output's ADC gain (common range over
    its calibrated range) and digital output scale, indexed from c0. clipped[b] receives the
    number of clipped outputs of row b. One branch-free pass per step, so that each loop
    vectorizes.
    """
    n_out = acc.shape[1]
    rounding = qmax > 0
    limit = qmax if rounding else bound
    v = np.empty(n_out)
    z = np.empty(n_out)
    hashes = np.empty(n_out, dtype=np.uint64)
    for b in range(lo, hi):
        r = rows[b]
        for i in range(n_out):
            v[i] = np.float64(acc[b, i]) * k_acc * gain[c0 + i]
        if noise_type >= 0:
            fill_row_normals(row_key(key, r), z, hashes)
            if noise_type == _NOISE_PROPORTIONAL:
                for i in range(n_out):
                    v[i] += np.sqrt(sig_out2 + w_noise2 * np.float64(pacc[b, i])) * k_noise * gain[c0 + i] * z[i]
            else:
                q_add = 0.0
                if noise_type == _NOISE_ADDITIVE:
                    for j in range(r0, r1):
                        q_add += np.float64(codes[b, j]) * np.float64(codes[b, j])
                std = np.sqrt(sig_out2 + w_noise2 * q_add) * k_noise
                for i in range(n_out):
                    v[i] += std * gain[c0 + i] * z[i]
        if rounding:
            for i in range(n_out):
                v[i] = np.rint(v[i])
        count = 0
        if limit > 0.0:
            for i in range(n_out):
                c = min(max(v[i], -limit), limit)
                count += c != v[i]
                v[i] = c
        clipped[b] = count
        if count == 0 or accept_clipped:
            s = out_scale[r]
            for i in range(n_out):
                y[r, c0 + i] += v[i] * s * factor[c0 + i] / gain[c0 + i]


@njit(cache=True, parallel=True)
def _encode_parallel(n, *args):
    for chunk in prange((n + _CHUNK - 1) // _CHUNK):
        _encode_rows(chunk * _CHUNK, min(n, (chunk + 1) * _CHUNK), *args)


@njit(cache=True, parallel=True)
def _read_out_parallel(n, *args):
    for chunk in prange((n + _CHUNK - 1) // _CHUNK):
        _read_out_rows(chunk * _CHUNK, min(n, (chunk + 1) * _CHUNK), *args)


def _run_rows(serial, parallel, n: int, work: int, *args) -> None:
    """Run a row kernel over rows 0..n-1: in parallel chunks when the work pays for the threads."""
    if work >= PARALLEL_MIN_WORK and numba.get_num_threads() > 1:
        parallel(n, *args)
    else:
        serial(0, n, *args)


@dataclass(frozen=True)
class Tile:
    """One physical array: inputs r0:r1 x outputs c0:c1 of the logical matrix."""

    r0: int
    r1: int
    c0: int
    c1: int
    G: np.ndarray            # (r1 - r0, c1 - c0): (g+ - g-).T in level units, config dtype
    G_abs: np.ndarray | None  # |G|, kept only for "proportional" read noise


@dataclass
class MVMStats:
    """Counters of the last ``mvm`` call."""

    clipped_outputs: int = 0   # clipped ADC outputs that ended up in y
    bm_retries: int = 0        # (vector, tile) pairs redone by bound management


def _positive(name: str, value: np.ndarray | None, n: int) -> np.ndarray | None:
    """A per-line range (n,) of positive finite values, or None."""
    if value is None:
        return None
    value = check_array(name, value, shape=(n,)).astype(np.float64)
    if not np.all(value > 0):
        raise ValueError(f"{name} must hold ranges > 0, got minimum {value.min()}")
    return value


class CrossbarArray:
    """A programmed crossbar holding W (out, in); see the module docstring for the pipeline.

    Calibrated converters (``qs4d_np.hardware.calibration``): ``in_range`` (in,) divides
    each input digitally before noise management and the DAC (the array holds W * in_range,
    so the product is unchanged); ``out_range`` (out,) is each output's ADC range in
    normalized units (the ADC step scales with it; the common ``out_bound`` otherwise).
    ``CrossbarConfig.weight_scaling`` "output" maps each output's weights to the full
    conductance range with a digital scale per output. Drift and its compensation follow
    ``CrossbarConfig.t_inference`` (``qs4d_np.hardware.conductance``).
    """

    def __init__(self, W: np.ndarray, config: CrossbarConfig | None = None,
                 seed: int | np.random.Generator | None = None, *, in_range: np.ndarray | None = None,
                 out_range: np.ndarray | None = None) -> None:
        self.config = config if config is not None else CrossbarConfig()
        if not isinstance(self.config, CrossbarConfig):
            raise TypeError(f"config must be a CrossbarConfig, got {type(self.config).__name__}")
        W = check_array("W", W, ndim=2, min_size=1)
        cfg = self.config
        self.out_features, self.in_features = W.shape
        if not cfg.tiling and (self.in_features > cfg.tile_rows or self.out_features > cfg.tile_cols):
            raise ValueError(
                f"W of shape {W.shape} (out, in) does not fit one {cfg.tile_rows} x {cfg.tile_cols} array "
                "(CrossbarConfig.tile_rows inputs x tile_cols outputs) and CrossbarConfig.tiling is False")
        self.in_range = _positive("in_range", in_range, self.in_features)
        out_range = _positive("out_range", out_range, self.out_features)
        if out_range is not None and cfg.out_bound is None:
            raise ValueError("out_range needs a converter range to scale: CrossbarConfig.out_bound is None")
        self._rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        W = W.astype(np.float64)
        if self.in_range is not None:
            W = W * self.in_range[None, :]
        self.out_factor = np.ones(self.out_features)
        if cfg.weight_scaling == "output":
            rows = np.abs(W).max(axis=1)
            self.out_factor = np.where(rows > 0, rows, 1.0)
            W = W / self.out_factor[:, None]
        self.out_gain = np.ones(self.out_features) if out_range is None else cfg.out_bound / out_range
        self.conductances: Conductances = program_conductances(W, cfg, self._rng)
        self.dtype = np.dtype(cfg.dtype)
        self.g_unit = self.conductances.g_unit
        self.tiles = self._build_tiles()
        self.stats = MVMStats()

    def _build_tiles(self) -> list[Tile]:
        cfg = self.config
        cond = self.conductances
        g_pos_all, g_neg_all = drift_conductances(cond.g_pos, cond.g_neg, cond.g_unit, cfg, self._rng)
        if g_pos_all is not cond.g_pos and cfg.drift_compensation:
            # one global factor: mean |output| of an all-ones read-out input before over after drift
            self.out_factor = self.out_factor * drift_compensation((cond.g_pos - cond.g_neg).sum(axis=1),
                                                                   (g_pos_all - g_neg_all).sum(axis=1))
        tiles = []
        for r0 in range(0, self.in_features, cfg.tile_rows):
            r1 = min(r0 + cfg.tile_rows, self.in_features)
            for c0 in range(0, self.out_features, cfg.tile_cols):
                c1 = min(c0 + cfg.tile_cols, self.out_features)
                g_pos = g_pos_all[c0:c1, r0:r1]
                g_neg = g_neg_all[c0:c1, r0:r1]
                if cfg.ir_drop > 0.0:
                    g_pos, g_neg = apply_ir_drop(g_pos, g_neg, self.g_unit, cfg.ir_drop)
                G = np.ascontiguousarray((g_pos - g_neg).T, dtype=self.dtype)
                G_abs = np.abs(G) if cfg.w_noise > 0 and cfg.w_noise_type == "proportional" else None
                tiles.append(Tile(r0, r1, c0, c1, G, G_abs))
        return tiles

    @property
    def weights(self) -> np.ndarray:
        """The effective weight matrix (out, in) the tiles realise (programming noise, drift and its
        compensation, IR drop and the digital input and output scales included)."""
        W = np.empty((self.out_features, self.in_features))
        for t in self.tiles:
            W[t.c0:t.c1, t.r0:t.r1] = t.G.T.astype(np.float64) * self.g_unit * self.conductances.w_absmax
        W *= self.out_factor[:, None]
        return W if self.in_range is None else W / self.in_range[None, :]

    def conductances_uS(self) -> tuple[np.ndarray, np.ndarray]:
        """Programmed (G+, G-) in microsiemens, shaped (out, in), before IR drop."""
        scale = self.g_unit * self.config.g_max
        return self.conductances.g_pos * scale, self.conductances.g_neg * scale

    def mvm(self, x: np.ndarray) -> np.ndarray:
        """y (batch, out) ~ x @ W.T for x (batch, in); updates ``self.stats``."""
        x = check_array("x", x, ndim=2)
        if x.shape[1] != self.in_features or x.shape[0] < 1:
            raise ValueError(f"x must have shape (batch >= 1, {self.in_features}), got {x.shape}")
        if self.in_range is not None:
            x = x / self.in_range
        cfg = self.config
        batch = x.shape[0]
        qmax_in = float(cfg.inp_qmax)
        inp_bound = cfg.inp_bound if cfg.inp_bound is not None else 0.0
        all_rows = np.arange(batch, dtype=np.int64)
        codes0 = np.empty((batch, self.in_features), dtype=self.dtype)
        row_scale = np.ones(batch)
        # noise management: s_b = absmax / inp_bound (or / 1 without a DAC bound), computed by _encode
        nm_target = 0.0 if cfg.noise_management == "none" else (cfg.inp_bound or 1.0)
        _run_rows(_encode_rows, _encode_parallel, batch, x.size, x, all_rows, row_scale, nm_target, 1.0,
                  cfg.inp_step, qmax_in, inp_bound, codes0)
        out_scale = cfg.out_step * self.conductances.w_absmax * row_scale

        noise_type, call_key = -1, 0
        if cfg.has_read_noise:
            noise_type = _NOISE_OUT_ONLY
            if cfg.w_noise > 0:
                noise_type = _NOISE_ADDITIVE if cfg.w_noise_type == "additive" else _NOISE_PROPORTIONAL
            call_key = int(self._rng.integers(0, 2 ** 63))
        inp_step = cfg.inp_step
        k_acc = inp_step * self.g_unit / cfg.out_step
        k_noise = 1.0 / cfg.out_step
        # q_bi in normalized units: codes carry one inp_step each (and Gdiff one g_unit)
        w_noise2 = cfg.w_noise ** 2 * inp_step ** 2 * (self.g_unit if noise_type == _NOISE_PROPORTIONAL else 1.0)
        qmax_out = float(cfg.out_qmax)
        out_bound = cfg.out_bound if (cfg.out_bound is not None and cfg.adc_bits is None) else 0.0
        max_round = cfg.bm_max_rounds if cfg.bound_management else 0

        y = np.zeros((batch, self.out_features), dtype=self.dtype)
        stats = MVMStats()
        for t_index, tile in enumerate(self.tiles):
            rows, codes = all_rows, codes0
            for k in range(max_round + 1):
                if k > 0:
                    codes = np.empty((rows.size, self.in_features), dtype=self.dtype)
                    _run_rows(_encode_rows, _encode_parallel, rows.size, codes.size, x, rows, row_scale, 0.0,
                              2.0 ** -k, inp_step, qmax_in, inp_bound, codes)
                    stats.bm_retries += rows.size
                tile_codes = codes[:, tile.r0:tile.r1]
                acc = tile_codes @ tile.G
                pacc = (tile_codes * tile_codes) @ tile.G_abs if tile.G_abs is not None else acc
                key = derive_key(call_key, t_index, k)
                clipped = np.zeros(rows.size, dtype=np.int64)
                last = k == max_round
                _run_rows(_read_out_rows, _read_out_parallel, rows.size, acc.size, acc, pacc, codes, tile.r0,
                          tile.r1, rows, noise_type, cfg.out_noise ** 2, w_noise2, k_acc, k_noise, qmax_out,
                          out_bound, key, last, out_scale * 2.0 ** k, self.out_gain, self.out_factor, y,
                          tile.c0, clipped)
                if last:
                    stats.clipped_outputs += int(clipped.sum())
                    break
                redo = clipped > 0
                if not redo.any():
                    break
                rows = rows[redo]
        self.stats = stats
        return y


def program(W: np.ndarray, config: CrossbarConfig | None = None,
            seed: int | np.random.Generator | None = None) -> CrossbarArray:
    """Program W (out, in) onto crossbar tiles (programming noise drawn once from ``seed``)."""
    return CrossbarArray(W, config, seed)
