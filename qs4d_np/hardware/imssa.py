"""IMSSA mapping: one S4D layer's recurrence on crossbar arrays (``AnalogSSMCore``).

The recurrence of one channel h with M complex modes is made real: the state
x (M complex) becomes s = [Re x_0, Im x_0, Re x_1, Im x_1, ...] (2M reals),
and each mode's Abar becomes the 2x2 block [[Re a, -Im a], [Im a, Re a]]. The
output y_t = 2Re(C x_t) + D u_t with x_t = Abar x_{t-1} + Bbar u_t is read in one of
two ways (``CrossbarConfig.ssm_readout``).

"direct": one MVM per step gives the new state and the output together, from x_{t-1} and
u_t; the square step matrix (n_h = 2M + 1 outputs x 2M + 1 inputs) is

    [ s_t ]   [ blockdiag(Abar)     Bbar                  ] [ s_{t-1} ]
    [ y_t ] = [ 2C*Abar (real row)  2Re(sum C*Bbar) + D   ] [ u_t     ]

(Re(w x) = Re w Re x - Im w Im x gives the row's entries 2Re(C_m Abar_m), -2Im(C_m Abar_m)).
The output is C times the new state before any converter: a model whose state is quantized
reads C on the quantized state instead, which this row cannot do.

"delayed": the output row reads the coded state itself, one MVM later. At step t the state
lines hold s_{t-1} (as the DAC codes it), the input line u_t, and one extra input line per
channel the previous input u_{t-1}; the step matrix (2M + 1 outputs x 2M + 2 inputs) is

    [ s_t     ]   [ blockdiag(Abar)       Bbar  0 ] [ s_{t-1} ]
    [ y_{t-1} ] = [ 2Re C, -2Im C (row)   0     D ] [ u_t     ]
                                                    [ u_{t-1} ]

so y_{t-1} = 2Re(C x_{t-1}) + D u_{t-1} on the state lines' grid (with ``state_grid``
"model", the digital state quantizer's: the model's own read-out). A sequence of L steps
takes L + 1 reads: the first converts only the state rows (there is no y_{-1}), the last,
with the input line at 0, only the output rows; the ADC conversions are the same as
"direct" (L per line). The streaming step runs both reads for each step.

Cells (ours): only the cells of that structure hold a device: per mode the four
Abar cells, two Bbar cells and two output-row cells, per channel the D cell (8M + 1
of the (2M + 1)^2 or (2M + 1)(2M + 2) positions). The other positions of a block are left
unprogrammed (no device, no current, no programming noise), so the arrays compute exactly
the structured product and the recurrence costs O(M) per channel and step, not O(M^2).

Packing: the channels' blocks sit on the block diagonal of an array, as many
consecutive channels per array as fit in ``tile_rows`` inputs x ``tile_cols`` outputs. A
channel must fit one tile (2M + 1, or 2M + 2 delayed, inputs and 2M + 1 outputs), as IMSSA
maps a channel per array; noise and bound management act per array.

Pruned parts drop out (``qs4d_np.hardware.pruning`` makes them exactly zero):
a mode with C_m = 0 has no effect on any output and is not mapped, a channel
with no mode left and D_h = 0 outputs zero and gets no cells. The rule: a
mode (h, m) is mapped iff C[h, m] != 0; a channel iff it has a mapped mode or
D[h] != 0.

A QAT layer is programmed with the values its recurrent mode computes with (the
quantized Abar, Bbar, C, D: ``S4D.effective_ssm``). Its state quantizer has no
counterpart: the state lives in the arrays' ADC and DAC codes (with
``CrossbarConfig.bits_from_model``, at the state quantizer's width).

Converters: per array, inputs are scaled digitally (``r``: one per input line, from
calibration, else 1), noise-managed, converted by the DAC, summed by the cells,
perturbed by read noise, converted by the ADC (step per output line, from calibration,
else the config's ``out_bound``), bound-managed and scaled back (weight scale, drift
compensation); ``qs4d_np.hardware.imssa_kernel`` has the exact arithmetic, all time steps
in one Numba kernel, and ``reference.analog`` its step-by-step twin.

Counts (per sample, first-round conversions; bound-management reruns are counted
separately): ADC conversions of a layer = L * sum_h n_h (either read-out); array reads
L (direct) or L + 1 (delayed) per array; ``mapping_counts`` gives the model's arrays,
conversions, reads and input lines from the shapes and the modes the quantized C keeps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from qs4d_np.core.checks import check_float, check_int, check_sequence_input
from qs4d_np.core.module import Module
from qs4d_np.hardware.calibration import RangeRecorder, column_groups
from qs4d_np.hardware.conductance import apply_ir_drop, drift_compensation, drift_conductances, program_conductances
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.imssa_kernel import (NOISE_ADDITIVE, NOISE_NONE, NOISE_OUT_ONLY, NOISE_PROPORTIONAL,
                                           imssa_scan)
from qs4d_np.ssm.core import STATIC_SCALE_MODES, S4DCore
from qs4d_np.ssm.params import SSMParams

# Default state register: this many times the largest calibrated state range of the layer.
STATE_HEADROOM = 16.0


# -- the per-channel matrix --------------------------------------------------
def active_modes(C: np.ndarray) -> list[np.ndarray]:
    """Per channel, the indices of the modes that are mapped (C[h, m] != 0). C: (H, M) complex."""
    return [np.flatnonzero(row != 0) for row in C]


def channel_matrix(Abar: np.ndarray, Bbar: np.ndarray, C: np.ndarray, D: float,
                   delayed: bool = False) -> np.ndarray:
    """The real step matrix of one channel (see the module docstring): (2m + 1) x (2m + 1)
    direct, (2m + 1) x (2m + 2) delayed.

    Abar, Bbar, C: (m,) complex (the channel's mapped modes); D: the skip.
    Rows: [Re x_0, Im x_0, ..., Re x_{m-1}, Im x_{m-1}, y]; columns the same with u in
    place of y, then (delayed) the previous input.
    """
    m = Abar.shape[0]
    n = 2 * m + 1
    out = np.zeros((n, n + int(delayed)))
    idx = 2 * np.arange(m)
    out[idx, idx] = Abar.real
    out[idx, idx + 1] = -Abar.imag
    out[idx + 1, idx] = Abar.imag
    out[idx + 1, idx + 1] = Abar.real
    out[idx, n - 1] = Bbar.real
    out[idx + 1, n - 1] = Bbar.imag
    if delayed:
        out[n - 1, idx] = 2 * C.real
        out[n - 1, idx + 1] = -2 * C.imag
        out[n - 1, n] = D
        return out
    CA = C * Abar
    out[n - 1, idx] = 2 * CA.real
    out[n - 1, idx + 1] = -2 * CA.imag
    out[n - 1, n - 1] = 2 * np.sum(C * Bbar).real + D
    return out


def pack_channels(sizes: list[int], tile_rows: int, tile_cols: int, extra_inputs: int = 0) -> list[tuple[int, int]]:
    """Consecutive channel ranges [h0, h1) whose blocks share one array: channel h has sizes[h]
    outputs and sizes[h] + extra_inputs inputs.

    A range grows while the summed inputs fit tile_rows and the summed outputs tile_cols; a
    channel bigger than a tile gets a range of its own. Channels of size 0 are skipped (not
    mapped).
    """
    groups: list[tuple[int, int]] = []
    h0, used = None, 0
    for h, n in enumerate(sizes):
        if n == 0:
            if h0 is not None:
                groups.append((h0, h))
                h0, used = None, 0
            continue
        if h0 is not None and (used + n + extra_inputs * (h - h0 + 1) > tile_rows or used + n > tile_cols):
            groups.append((h0, h))
            h0, used = None, 0
        if h0 is None:
            h0 = h
        used += n
    if h0 is not None:
        groups.append((h0, len(sizes)))
    return groups


def tiles(rows_in: int, cols_out: int, cfg: CrossbarConfig) -> int:
    """Physical arrays a dense rows_in x cols_out matrix takes."""
    return math.ceil(rows_in / cfg.tile_rows) * math.ceil(cols_out / cfg.tile_cols)


# -- layout -----------------------------------------------------------------
@dataclass(frozen=True)
class IMSSALayout:
    """Which channels and modes of a layer hold cells, and which array holds each channel.

    ``channel`` (C,): the mapped channels; ``mode`` (E,): the mode index (0..M-1) of each
    mapped mode, channel by channel; ``mode_ptr`` (C + 1,): channel c's modes are
    ``mode_ptr[c]:mode_ptr[c+1]``; ``arr_ptr`` (A + 1,): array a holds channels
    ``arr_ptr[a]:arr_ptr[a+1]``. ``H``, ``M``: the layer's d_model and d_state / 2.
    ``delayed``: the output rows read the coded state one MVM later (module docstring), from
    an extra input line per channel.
    """

    channel: np.ndarray
    mode: np.ndarray
    mode_ptr: np.ndarray
    arr_ptr: np.ndarray
    H: int
    M: int
    delayed: bool = False

    @classmethod
    def of(cls, C: np.ndarray, D: np.ndarray, config: CrossbarConfig, delayed: bool = False) -> "IMSSALayout":
        """The layout of a layer with read-out C (H, M) complex and skip D (H,) (module docstring)."""
        H, M = C.shape
        modes = active_modes(C)
        sizes = [2 * len(m) + 1 if (len(m) or D[h] != 0) else 0 for h, m in enumerate(modes)]
        n_out = max(sizes, default=0)
        n_in = n_out + int(delayed and n_out > 0)
        if n_in > config.tile_rows or n_out > config.tile_cols:
            raise ValueError(f"an S4D channel with {n_out // 2} mapped modes needs {n_in} inputs x {n_out} "
                             f"outputs, more than a {config.tile_rows} x {config.tile_cols} tile "
                             "(CrossbarConfig.tile_rows inputs x tile_cols outputs); IMSSA maps a channel per "
                             f"array: use tiles of at least {n_in} x {n_out}")
        groups = pack_channels(sizes, config.tile_rows, config.tile_cols, int(delayed))
        channel = np.array([h for h0, h1 in groups for h in range(h0, h1)], dtype=np.int64)
        counts = [len(modes[h]) for h in channel]
        mode_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        mode = np.concatenate([modes[h] for h in channel] + [np.zeros(0, np.int64)]).astype(np.int64)
        arr_ptr = np.concatenate([[0], np.cumsum([h1 - h0 for h0, h1 in groups])]).astype(np.int64)
        return cls(channel, mode, mode_ptr, arr_ptr, H, M, bool(delayed))

    @property
    def n_modes(self) -> int:
        return int(self.mode.shape[0])

    @property
    def n_arrays(self) -> int:
        return int(self.arr_ptr.shape[0] - 1)

    @property
    def lines(self) -> int:
        """Output lines of all arrays (= their state and input lines): 2 per mode, 1 per channel."""
        return 2 * self.n_modes + int(self.channel.shape[0])

    @property
    def input_lines(self) -> int:
        """Input lines of all arrays: ``lines``, plus the previous-input line per channel when delayed."""
        return self.lines + int(self.delayed) * int(self.channel.shape[0])

    def reads(self, length: int) -> int:
        """Reads of every array for a sequence of ``length`` steps (module docstring)."""
        return length + int(self.delayed)

    def mode_channel(self) -> np.ndarray:
        """(E,) the position c (0..C-1) of each mode's channel."""
        return np.repeat(np.arange(self.channel.shape[0]), np.diff(self.mode_ptr))

    def line_array(self) -> np.ndarray:
        """(2E + C,) the array of every line (state lines 2e + p, then input lines 2E + c)."""
        arr_of_ch = np.repeat(np.arange(self.n_arrays), np.diff(self.arr_ptr))
        return np.concatenate([np.repeat(arr_of_ch[self.mode_channel()], 2), arr_of_ch])

    def dense_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where each line sits in its array's dense block (outputs x inputs): (array (2E + C,),
        output position (2E + C,), input position (2E + C + C delayed,)), channel by channel
        [re_0, im_0, ..., y] and [re_0, im_0, ..., u(, previous u)] as ``channel_matrix`` orders
        them; the previous-input lines come last in the input positions."""
        E, n_ch, extra = self.n_modes, int(self.channel.shape[0]), int(self.delayed)
        out_pos = np.empty(self.lines, dtype=np.int64)
        in_pos = np.empty(self.input_lines, dtype=np.int64)
        for a in range(self.n_arrays):
            row = col = 0
            for c in range(self.arr_ptr[a], self.arr_ptr[a + 1]):
                e0, e1 = self.mode_ptr[c], self.mode_ptr[c + 1]
                k = 2 * (e1 - e0)
                out_pos[2 * e0:2 * e1] = row + np.arange(k)
                out_pos[2 * E + c] = row + k
                in_pos[2 * e0:2 * e1] = col + np.arange(k)
                in_pos[2 * E + c] = col + k
                if extra:
                    in_pos[2 * E + n_ch + c] = col + k + 1
                row += k + 1
                col += k + 1 + extra
        return self.line_array(), out_pos, in_pos


@dataclass(frozen=True)
class Cells:
    """The values of a layer's cells (float64), as ``imssa_kernel`` orders them: ``a`` (E, 4) the
    Abar block rr, ri, ir, ii; ``b`` (E, 2) the Bbar column; ``c`` (E, 2) the output row over the
    state lines; ``d`` (C,) the output row's cell on the input line (direct) or on the previous-input
    line (delayed)."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    d: np.ndarray

    @classmethod
    def of(cls, eff: SSMParams, layout: IMSSALayout) -> "Cells":
        """The exact step matrix entries of ``channel_matrix`` for the mapped modes of ``eff``."""
        ch = layout.channel[layout.mode_channel()]
        A, B, C = (z[ch, layout.mode] for z in (eff.Abar, eff.Bbar, eff.C))
        a = np.stack([A.real, -A.imag, A.imag, A.real], axis=1)
        b = np.stack([B.real, B.imag], axis=1)
        if layout.delayed:  # the output row reads the coded state and the previous input
            return cls(a, b, np.stack([2 * C.real, -2 * C.imag], axis=1), eff.D[layout.channel].astype(np.float64))
        CA = C * A
        c = np.stack([2 * CA.real, -2 * CA.imag], axis=1)
        CB = np.zeros(layout.channel.shape[0])
        np.add.at(CB, layout.mode_channel(), (C * B).real)
        d = 2 * CB + eff.D[layout.channel]
        return cls(a, b, c, d)

    def scaled(self, r_s: np.ndarray, r_u: np.ndarray, mode_channel: np.ndarray) -> "Cells":
        """Each cell times its input line's scale (so that scaled inputs z / r give the same sums)."""
        r_ue = r_u[mode_channel]
        return Cells(self.a * r_s[:, [0, 1, 0, 1]], self.b * r_ue[:, None], self.c * r_s, self.d * r_u)

    def row_absmax(self, layout: IMSSALayout) -> tuple[np.ndarray, np.ndarray]:
        """The largest |cell| of every state row (E, 2) and output row (C,)."""
        rows_s = np.stack([np.abs(self.a[:, :2]).max(1), np.abs(self.a[:, 2:]).max(1)], axis=1)
        rows_s = np.maximum(rows_s, np.abs(self.b))
        rows_y = np.abs(self.d).copy()
        np.maximum.at(rows_y, layout.mode_channel(), np.abs(self.c).max(1))
        return rows_s, rows_y

    def flat(self) -> np.ndarray:
        return np.concatenate([self.a.ravel(), self.b.ravel(), self.c.ravel(), self.d])

    def like(self, values: np.ndarray) -> "Cells":
        """Cells of the same shapes from a ``flat()``-ordered vector."""
        sizes = [self.a.size, self.b.size, self.c.size]
        a, b, c, d = np.split(values, np.cumsum(sizes))
        return Cells(a.reshape(self.a.shape), b.reshape(self.b.shape), c.reshape(self.c.shape), d)

    def positions(self, layout: IMSSALayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(array, row, column) in the arrays' dense blocks (outputs x inputs) of every cell, in
        ``flat()`` order."""
        arr, out_pos, in_pos = layout.dense_index()
        E, n_ch = layout.n_modes, layout.channel.shape[0]
        s = np.arange(E)
        io = 2 * E + layout.mode_channel()
        a_rows = np.stack([2 * s, 2 * s, 2 * s + 1, 2 * s + 1], axis=1).ravel()
        a_cols = np.stack([2 * s, 2 * s + 1, 2 * s, 2 * s + 1], axis=1).ravel()
        b_rows, b_cols = np.stack([2 * s, 2 * s + 1], axis=1).ravel(), np.repeat(io, 2)
        c_rows, c_cols = np.repeat(io, 2), np.stack([2 * s, 2 * s + 1], axis=1).ravel()
        d_lines = 2 * E + np.arange(n_ch)
        row_line = np.concatenate([a_rows, b_rows, c_rows, d_lines])
        col_line = np.concatenate([a_cols, b_cols, c_cols, d_lines + n_ch * layout.delayed])
        return arr[row_line], out_pos[row_line], in_pos[col_line]


# -- programming ------------------------------------------------------------
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
                layout.channel, layout.mode_ptr, layout.arr_ptr, layout.delayed, major(G.a), major(G.b), major(G.c), G.d,
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


def _model_state_range(core: S4DCore) -> tuple[np.ndarray, float]:
    """((H, 2) the clip range (largest code / codes per unit) of the core's static, symmetric state
    quantizer for the real and imaginary parts, its largest code) (``CrossbarConfig.state_grid``
    "model")."""
    x = core.state_quantizer
    if x is None:
        raise ValueError("CrossbarConfig.state_grid='model' needs layers whose state is quantized (a 'state' "
                         "target); this layer's state is float")
    if x.scale_mode not in STATIC_SCALE_MODES:
        raise ValueError(f"CrossbarConfig.state_grid='model' needs a static state range; quantizer {x.name!r} has "
                         f"scale_mode={x.scale_mode!r} (calibrate a 'running' range with qs4d_np.train.ptq)")
    parts = x.frozen_parts(core.d_model, np.dtype(np.float64))
    if any(np.any(part.zp != 0) for part in parts):
        raise ValueError(f"CrossbarConfig.state_grid='model' needs a symmetric state grid; {x.name!r} has zero points")
    return np.stack([float(part.qmax) / part.inv for part in parts], axis=1), float(parts[0].qmax)


# -- the analog core -----------------------------------------------------------
def delayed_readout(config: CrossbarConfig, quantized_state: bool) -> bool:
    """Whether a layer's output rows read the coded state one MVM later (``CrossbarConfig.ssm_readout``;
    "auto": when the layer's state is quantized, as the model then reads C on its quantized state)."""
    return config.ssm_readout == "delayed" or (config.ssm_readout == "auto" and quantized_state)


@dataclass
class AnalogCounters:
    """What an analog part used so far (summed over forwards and steps)."""

    samples: int = 0
    mvms: int = 0
    adc_conversions: int = 0
    adc_clipped: int = 0
    bm_retries: int = 0
    overflowed: int = 0

    def add(self, other: "AnalogCounters") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class AnalogSSMCore(Module):
    """An S4D core whose recurrence runs on IMSSA crossbar arrays (module docstring), for inference.

    Built by ``qs4d_np.hardware.to_analog`` in place of a layer's ``S4DCore`` (``digital``, kept
    as an inline child: the parameters keep their names and values). Programmed once with the
    values the digital core's recurrent mode computes with (``program()``); ``forward(u)`` (any ``mode``: the
    arrays run the recurrence) draws fresh read noise from ``rng`` at every call. ``frozen()``
    gives the streaming step on the same arrays.

    ``state_bound``: the digital state register saturates at +-state_bound (model units) and a
    sample whose state got there (or went non-finite) is counted as overflowed
    (``last_overflow``, ``counters.overflowed``); None: ``STATE_HEADROOM`` times the largest
    calibrated state range of the layer, or no bound (only non-finite states overflow) when
    uncalibrated.
    """

    def __init__(self, digital: S4DCore, config: CrossbarConfig, rng: np.random.Generator, *,
                 state_bound: float | None = None) -> None:
        super().__init__()
        self.digital = self.add_child("digital", digital, inline=True)
        state_q = digital.state_quantizer
        if config.bits_from_model and state_q is not None:
            config = config.with_bits(state_q.bits if config.dac_bits is not None else None,
                                      state_q.bits if config.adc_bits is not None else None)
        self.config = config
        self.state_grid = _model_state_range(digital) if config.state_grid == "model" else None
        self.state_bound_setting = (None if state_bound is None else
                                    check_float("state_bound", state_bound, min_value=0.0, min_inclusive=False))
        eff = digital.effective("recurrent")
        self.layout = IMSSALayout.of(eff.C, eff.D, config, delayed_readout(config, state_q is not None))
        self.cells = Cells.of(eff, self.layout)
        self.ranges: Ranges | None = None
        self._rng = rng
        self.counters = AnalogCounters()
        self.last_overflow = np.zeros(0, dtype=np.int64)
        self._recorder: RangeRecorder | None = None
        self.programmed: ProgrammedIMSSA | None = None

    def program(self) -> None:
        """Program the arrays with the calibrated ranges, if any (programming noise and drift drawn from
        the core's generator)."""
        self.programmed = program_layer(self.cells, self.layout, self.config, self.ranges, self._rng)

    # -- what the layer reads of its core ---------------------------------------
    d_model = property(lambda self: self.digital.d_model)
    d_state = property(lambda self: self.digital.d_state)
    dtype = property(lambda self: self.digital.dtype)
    cdtype = property(lambda self: self.digital.cdtype)
    disc = property(lambda self: self.digital.disc)
    init = property(lambda self: self.digital.init)
    abar = property(lambda self: self.digital.abar)
    quant = property(lambda self: self.digital.quant)
    layer = property(lambda self: self.digital.layer)
    state_clip = property(lambda self: self.digital.state_clip)
    q = property(lambda self: self.digital.q)

    def effective(self, mode: str = "recurrent") -> SSMParams:
        """The digital core's parameters: the values the arrays were programmed with (before noise)."""
        return self.digital.effective(mode)

    def data_range_quantizer(self) -> str | None:
        """None: the analog recurrence does not run the digital state quantizer."""
        return None

    @property
    def state_bound(self) -> float:
        """The state register's bound in use (inf: none)."""
        if self.state_bound_setting is not None:
            return self.state_bound_setting
        if self.ranges is None or self.ranges.state_max == 0:
            return math.inf
        return STATE_HEADROOM * self.ranges.state_max

    @property
    def n_tiles(self) -> int:
        return self.layout.n_arrays

    # -- calibration ---------------------------------------------------------
    def start_calibration(self, phase: str) -> None:
        """Record ranges from the next forwards, computing the exact values: phase "inputs" (with unit
        scales) or "outputs" (with the input scales found, as the ADC will see them)."""
        self._recorder = RangeRecorder(phase, self.layout.lines, self.layout.lines)
        ranges = None if phase == "inputs" else self.ranges
        self.programmed = program_layer(self.cells, self.layout, self.config, ranges, None)

    def finish_calibration(self) -> None:
        """Turn what was recorded into ranges (``program()`` then programs with them)."""
        rec, self._recorder = self._recorder, None
        if rec is None:
            raise RuntimeError("finish_calibration() without start_calibration()")
        cfg, E = self.config, self.layout.n_modes
        # pooled per array: its state lines, and its input / output lines
        kind = (np.arange(self.layout.lines) >= 2 * E).astype(np.int64)
        groups = column_groups(2 * self.layout.line_array() + kind, cfg.calib_granularity)
        if rec.phase == "inputs":
            seen = rec.ranges(groups, cfg)
            state_step = None
            if self.state_grid is not None:  # the digital state quantizer's range on the state lines
                state_range, qmax = self.state_grid
                ch = self.layout.channel[self.layout.mode_channel()]
                seen[:2 * E] = state_range[ch].ravel()
                state_step = state_range[ch] / qmax
            r = np.where(seen > 0, seen / (cfg.inp_bound or 1.0), 1.0)  # a line that stayed 0: any scale
            self.ranges = Ranges(r[:2 * E].reshape(E, 2), r[2 * E:], np.zeros((E, 2)), np.zeros(0),
                                 float(np.max(seen[:2 * E], initial=0.0)), state_step)
            return
        R = rec.ranges(groups, cfg)
        R = np.where(R > 0, R, cfg.out_bound or 1.0)
        self.ranges = replace(self.ranges, R_s=R[:2 * E].reshape(E, 2), R_y=R[2 * E:])
        self.programmed = None

    # -- inference -----------------------------------------------------------------
    def _key(self) -> int:
        return int(self._rng.integers(0, 2 ** 63)) if self.programmed.noise_type != NOISE_NONE else 0

    def _check_programmed(self) -> None:
        if self.programmed is None:
            raise RuntimeError("AnalogSSMCore used before program(): build analog models with hardware.to_analog")

    def run(self, u: np.ndarray, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The arrays over u (B, L, H) from the state x0 (B, 2, E) (real, imaginary parts of the mapped
        modes) -> (y (B, L, H) in the core's dtype, final state (B, 2, E)); updates ``counters`` and
        ``last_overflow`` (B,)."""
        self._check_programmed()
        B, L, _ = u.shape
        record = None if self._recorder is None else self._recorder.new(B)
        y, x, clipped, retries, overflow = self.programmed.run(self.layout, u, x0, self._key(),
                                                               self.state_bound, record)
        if record is not None:
            self._recorder.add(*record)
        with np.errstate(over="ignore"):
            y = y.astype(self.dtype)
        # an output beyond the model's float range overflows the sample as a state beyond the bound does
        finite = np.isfinite(y)
        for b in np.flatnonzero(~finite.all(axis=(1, 2))):
            first = int(np.argmin(finite[b].all(axis=1)))
            overflow[b] = first if overflow[b] < 0 else min(first, overflow[b])
            y[b] = 0
        self.last_overflow = overflow
        self.counters.add(AnalogCounters(B, B * self.layout.reads(L) * self.layout.n_arrays, B * L * self.layout.lines,
                                         int(clipped.sum()), int(retries.sum()), int((overflow >= 0).sum())))
        return y, x

    def forward(self, u: np.ndarray, training: bool = False, mode: str = "recurrent", *,
                checked: bool = False) -> np.ndarray:
        """u (batch, length, d_model) -> y (batch, length, d_model) computed on the arrays; inference only."""
        if training:
            raise ValueError("an analog core runs inference only (training=True given); train the digital model")
        if not checked:
            u = check_sequence_input("u", u, self.d_model)
        y, _ = self.run(u, np.zeros((u.shape[0], 2, self.layout.n_modes)))
        self._cache = None
        return y

    def backward(self, grad: np.ndarray, *, checked: bool = False) -> np.ndarray:
        raise RuntimeError("an analog core has no backward: train the digital model, then convert it")

    def frozen(self) -> "AnalogCoreStep":
        """The streaming step on these arrays (``AnalogCoreStep``)."""
        return AnalogCoreStep(self)


class AnalogCoreStep:
    """One time step of an ``AnalogSSMCore``, with ``CoreStep``'s contract: ``step(u_t, state)``,
    u_t (batch, H), state (M, batch, H) complex (mode-major; modes that are not mapped stay 0)
    -> (y_t (batch, H), new state). Every step draws fresh read noise from the core. A delayed
    read-out reads the arrays twice per step (the state, then the output from the new state), so
    it gives the forward's numbers on a fixed grid (``noise_management`` "none", no bound-management
    reruns); absmax noise management scales the second read's vector, which holds no next input,
    differently."""

    def __init__(self, core: AnalogSSMCore) -> None:
        self.core = core
        layout = core.layout
        self._ch = layout.channel[layout.mode_channel()]
        self._mode = layout.mode

    def step(self, u_t: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = state[self._mode, :, self._ch].T  # (batch, E)
        y, x = self.core.run(u_t[:, None, :], np.stack([s.real, s.imag], axis=1))
        new = np.zeros_like(state)
        new[self._mode, :, self._ch] = (x[:, 0] + 1j * x[:, 1]).T
        return y[:, 0], new


def mapping_counts(model: Any, config: CrossbarConfig, length: int) -> dict[str, int]:
    """Per sample of ``length`` steps: arrays (tiles), ADC conversions, the SSM arrays' reads and their
    input lines (``ssm_readout`` "delayed" adds one line per channel and one read per sequence), from
    the shapes and the (quantized) C, D the recurrent mode computes with (``S4D.effective_ssm``)."""
    length = check_int("length", length, min_value=1)
    H = model.encoder.d_out
    n_tiles = tiles(model.d_input, H, config) + tiles(H, model.d_output, config)
    conversions = length * H + model.d_output
    reads = input_lines = 0
    for block in model.blocks:
        ssm = block.ssm
        eff = ssm.effective_ssm("recurrent")  # a QAT C quantized to 0 maps no mode
        layout = IMSSALayout.of(eff.C, eff.D, config, delayed_readout(config, ssm.core.state_quantizer is not None))
        n_tiles += layout.n_arrays
        conversions += length * layout.lines
        reads += layout.reads(length) * layout.n_arrays
        input_lines += layout.input_lines
        if ssm.mixing is not None:
            n_tiles += tiles(H, 2 * H, config)
            conversions += length * 2 * H
    return {"arrays": n_tiles, "adc_conversions_per_sample": conversions, "ssm_array_reads_per_sample": reads,
            "ssm_input_lines": input_lines}
