"""Programming a layer's IMSSA arrays (``qs4d_np.hardware.imssa_layout``): calibrated converter
ranges (``Ranges``), the cells' conductances with programming noise, IR drop and drift, and the
converter settings the kernel runs with (``ProgrammedIMSSA``).

Converters: per array, inputs are scaled digitally (``r``: one per input line, from
calibration, else 1), noise-managed, converted by the DAC, summed by the cells,
perturbed by read noise, converted by the ADC (step per output line, from calibration,
else the config's ``out_bound``), bound-managed and scaled back (weight scale, drift
compensation); ``qs4d_np.hardware.imssa_kernel`` has the exact arithmetic, all time steps
in one Numba kernel, and ``reference.analog`` its step-by-step twin.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qs4d_np.hardware.conductance import apply_ir_drop, drift_compensation, drift_conductances, program_conductances
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.imssa_kernel import (NOISE_ADDITIVE, NOISE_NONE, NOISE_OUT_ONLY, NOISE_PROPORTIONAL,
                                           imssa_scan)
from qs4d_np.hardware.imssa_layout import Cells, IMSSALayout


@dataclass(frozen=True)
class Ranges:
    """Calibrated converter ranges of a layer's arrays: input scales ``r_s`` (E, 2), ``r_u`` (C,)
    (a line's calibrated |z| maps to the DAC's full scale) and ADC ranges ``R_s`` (E, 2),
    ``R_y`` (C,) in normalized output units (``CrossbarConfig`` module docstring); ``state_max``:
    the largest calibrated state range (model units, 0 when every state stayed 0); ``state_step``
    (E, 2) or None: the state quantizer's step in model units (``state_grid`` "model"), which
    then sets the state rows' ADC step: the ADC rounds the new state onto the quantizer's grid
    (its extra bits widen the range), and the DAC codes it again exactly."""

    r_s: np.ndarray
    r_u: np.ndarray
    R_s: np.ndarray
    R_y: np.ndarray
    state_max: float
    state_step: np.ndarray | None = None


@dataclass(frozen=True)
class ProgrammedIMSSA:
    """A layer's programmed arrays and converter settings: what ``imssa_scan`` runs."""

    G: Cells                 # conductances g+ - g-, level units
    g_unit: float
    r_s: np.ndarray
    r_u: np.ndarray
    f_s: np.ndarray          # digital output scale of each state row (E, 2) and output row (C,)
    f_y: np.ndarray
    step_s: np.ndarray       # ADC step of each row in normalized units (1 without an ADC)
    step_y: np.ndarray
    lim_s: np.ndarray        # clamp without an ADC (in steps; 0 = none)
    lim_y: np.ndarray
    nm_target: float
    inp_step: float
    qmax_in: float
    clamp_in: float
    qmax_out: float
    noise_type: int
    out_noise: float
    w_noise: float
    max_round: int

    def scan_args(self, layout: IMSSALayout, u: np.ndarray, x0: np.ndarray, key: int, state_bound: float,
                  record: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[Any, ...]:
        """The arguments of ``imssa_scan`` for u (B, L, H) from x0 (B, 2, E); ``record``: (rec_in, rec_out)
        to fill (``reference.analog.imssa_scan`` takes the same). Per-mode arrays go component-major."""
        empty = np.zeros((0, 0))
        rec_in, rec_out = record if record is not None else (empty, empty)
        G = self.G

        def major(a: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(a.T, dtype=np.float64)

        return (np.ascontiguousarray(u, dtype=np.float64), np.ascontiguousarray(x0, dtype=np.float64),
                layout.channel, layout.mode_ptr, layout.arr_ptr, layout.delayed, layout.increment, major(G.a), major(G.b), major(G.c), G.d,
                major(self.r_s), self.r_u, major(self.f_s), self.f_y, major(self.step_s), self.step_y,
                major(self.lim_s), self.lim_y, self.nm_target, self.inp_step, self.qmax_in, self.clamp_in,
                self.g_unit, self.qmax_out, self.noise_type, self.out_noise, self.w_noise, self.max_round,
                np.uint64(key), float(state_bound), rec_in, rec_out)

    def run(self, *args: Any) -> tuple[np.ndarray, ...]:
        """``imssa_scan`` with ``scan_args(*args)``."""
        return imssa_scan(*self.scan_args(*args))


def _noise_type(cfg: CrossbarConfig) -> int:
    if not cfg.has_read_noise:
        return NOISE_NONE
    if cfg.w_noise == 0:
        return NOISE_OUT_ONLY
    return NOISE_ADDITIVE if cfg.w_noise_type == "additive" else NOISE_PROPORTIONAL


def _array_max(values_s: np.ndarray, values_y: np.ndarray, layout: IMSSALayout) -> np.ndarray:
    """(A,) the largest of per-row values over each array's rows."""
    line_arr = layout.line_array()
    out = np.zeros(layout.n_arrays)
    np.maximum.at(out, line_arr, np.concatenate([values_s.ravel(), values_y]))
    return out


def program_layer(cells: Cells, layout: IMSSALayout, config: CrossbarConfig, ranges: Ranges | None,
                  rng: np.random.Generator | None) -> ProgrammedIMSSA:
    """Program a layer's cells with ``config`` and calibrated ``ranges`` (None: the config's), drawing
    programming noise and drift from ``rng``; ``rng=None`` programs the exact values with exact
    converters (calibration: no quantization, clipping, noise or levels; noise management and
    weight scaling as configured)."""
    E, n_ch = layout.n_modes, layout.channel.shape[0]
    exact = rng is None
    r_s = np.ones((E, 2)) if ranges is None else ranges.r_s
    r_u = np.ones(n_ch) if ranges is None else ranges.r_u
    mc = layout.mode_channel()
    W = cells.scaled(r_s, r_u, mc)
    # weight scale per row ("output") or per array ("tensor"); an all-zero row keeps 1
    w_s, w_y = W.row_absmax(layout)
    if config.weight_scaling == "tensor":
        per_array = _array_max(w_s, w_y, layout)
        line_arr = layout.line_array()
        w_s, w_y = per_array[line_arr[:2 * E]].reshape(E, 2), per_array[line_arr[2 * E:]]
    w_s, w_y = (np.where(w > 0, w, 1.0) for w in (w_s, w_y))
    rows_s = np.stack([w_s[:, 0], w_s[:, 0], w_s[:, 1], w_s[:, 1]], axis=1)
    normalized = Cells(W.a / rows_s, W.b / w_s, W.c / w_y[mc][:, None], W.d / w_y)
    f_s, f_y = w_s, w_y
    nm_target = 0.0 if config.noise_management == "none" else (config.inp_bound or 1.0)
    if exact:
        G, g_unit = normalized, 1.0
        inp_step, qmax_in, clamp_in, qmax_out, noise_type, max_round = 1.0, 0.0, 0.0, 0.0, NOISE_NONE, 0
        step_s, step_y = np.ones((E, 2)), np.ones(n_ch)
        lim_s, lim_y = np.zeros((E, 2)), np.zeros(n_ch)
    else:
        target = normalized.flat()[None, :]
        # every nonzero row has max |target| = 1, so the conductances' own absmax scale is 1
        cond = program_conductances(target, config, rng)
        g_pos, g_neg = cond.g_pos, cond.g_neg
        if config.ir_drop > 0.0:
            g_pos, g_neg = _ir_drop(g_pos[0], g_neg[0], normalized, layout, cond.g_unit, config.ir_drop)
        drifted = drift_conductances(g_pos, g_neg, cond.g_unit, config, rng)
        G = normalized.like((drifted[0] - drifted[1])[0])
        G0 = normalized.like((g_pos - g_neg)[0])
        g_unit = cond.g_unit
        if config.t_inference > 0.0 and config.drift_compensation:
            factor = _drift_factors(G0, G, layout)
            line_arr = layout.line_array()
            f_s = f_s * factor[line_arr[:2 * E]].reshape(E, 2)
            f_y = f_y * factor[line_arr[2 * E:]]
        inp_step, qmax_in = config.inp_step, float(config.inp_qmax)
        clamp_in = config.inp_bound if (config.dac_bits is None and config.inp_bound is not None) else 0.0
        qmax_out = float(config.out_qmax)
        R_s = np.full((E, 2), config.out_bound or 0.0) if ranges is None else ranges.R_s
        R_y = np.full(n_ch, config.out_bound or 0.0) if ranges is None else ranges.R_y
        if config.adc_bits is not None:
            levels = 2 ** config.adc_bits - 2
            step_s, step_y = 2 * R_s / levels, 2 * R_y / levels
            if ranges is not None and ranges.state_step is not None:
                step_s = ranges.state_step / w_s  # in normalized units (noise management is off)
            lim_s, lim_y = np.zeros((E, 2)), np.zeros(n_ch)
        else:
            step_s, step_y = np.ones((E, 2)), np.ones(n_ch)
            lim_s, lim_y = R_s.astype(np.float64), R_y.astype(np.float64)
        noise_type, max_round = _noise_type(config), (config.bm_max_rounds if config.bound_management else 0)
    return ProgrammedIMSSA(G, g_unit, r_s, r_u, f_s, f_y, step_s, step_y, lim_s, lim_y, nm_target, inp_step,
                           qmax_in, clamp_in, qmax_out, noise_type, config.out_noise, config.w_noise, max_round)


def _ir_drop(g_pos: np.ndarray, g_neg: np.ndarray, cells: Cells, layout: IMSSALayout, g_unit: float,
             rho: float) -> tuple[np.ndarray, np.ndarray]:
    """First-order IR drop of every array, on its dense block (unprogrammed positions hold 0)."""
    arr, row, col = cells.positions(layout)
    out_pos, out_neg = g_pos.copy(), g_neg.copy()
    for a in range(layout.n_arrays):
        sel = np.flatnonzero(arr == a)
        shape = (int(row[sel].max()) + 1, int(col[sel].max()) + 1)
        dense_pos, dense_neg = np.zeros(shape), np.zeros(shape)
        dense_pos[row[sel], col[sel]] = g_pos[sel]
        dense_neg[row[sel], col[sel]] = g_neg[sel]
        dp, dn = apply_ir_drop(dense_pos, dense_neg, g_unit, rho)
        out_pos[sel], out_neg[sel] = dp[row[sel], col[sel]], dn[row[sel], col[sel]]
    return out_pos[None, :], out_neg[None, :]


def _drift_factors(G0: Cells, Gt: Cells, layout: IMSSALayout) -> np.ndarray:
    """(A,) global drift compensation of every array: its mean |output| for an all-ones read-out
    input right after programming over the same at t_inference (``conductance.drift_compensation``)."""
    def row_sums(G: Cells) -> tuple[np.ndarray, np.ndarray]:
        s = np.stack([G.a[:, :2].sum(1) + G.b[:, 0], G.a[:, 2:].sum(1) + G.b[:, 1]], axis=1)
        y = G.d.copy()
        np.add.at(y, layout.mode_channel(), G.c.sum(1))
        return s, y

    line_arr = layout.line_array()
    out = np.ones(layout.n_arrays)
    (s0, y0), (st, yt) = row_sums(G0), row_sums(Gt)
    before, after = np.concatenate([s0.ravel(), y0]), np.concatenate([st.ravel(), yt])
    for a in range(layout.n_arrays):
        sel = line_arr == a
        out[a] = drift_compensation(before[sel], after[sel])
    return out

