"""IMSSA layout: where one S4D layer's recurrence sits on crossbar arrays (cells, packing, counts).

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

State update (``CrossbarConfig.state_update``): "full" programs blockdiag(Abar) as above;
"increment" programs blockdiag(Abar - I) in its place, so the state rows give the change
d_t = (Abar - I) s_{t-1} + Bbar u_t and the periphery, which holds s_{t-1} in its state
register anyway, adds it: s_t = s_{t-1} + d_t. The same function of exact cells; but a cell's
programming error and a row's read noise now scale with |Abar - I| ~ dt |A|, which is small
exactly for the slowly decaying modes (|Abar| near 1) whose long memory integrates those
errors, where "full" perturbs |Abar| ~ 1 itself and can push such a mode past |Abar| = 1. With
the state rows' ADC on the state quantizer's grid and s_{t-1} on it, s_{t-1} + ADC(d_t) is the
grid point the digital quantizer picks for Abar s_{t-1} + Bbar u_t (ties aside). The direct
read-out's output row still holds C Abar (it reads C times the new state).

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

Counts (per sample, first-round conversions; bound-management reruns are counted
separately): ADC conversions of a layer = L * sum_h n_h (either read-out); array reads
L (direct) or L + 1 (delayed) per array; ``mapping_counts`` gives the model's arrays,
conversions, reads and input lines from the shapes and the modes the quantized C keeps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qs4d_np.core.checks import check_int
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.ssm.params import SSMParams


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
    an extra input line per channel. ``increment``: the state rows hold Abar - I and the
    periphery adds the held state (``CrossbarConfig.state_update``, module docstring).
    """

    channel: np.ndarray
    mode: np.ndarray
    mode_ptr: np.ndarray
    arr_ptr: np.ndarray
    H: int
    M: int
    delayed: bool = False
    increment: bool = False

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
        return cls(channel, mode, mode_ptr, arr_ptr, H, M, bool(delayed), config.state_update == "increment")

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
        # increment: the diagonal cells hold Re(Abar) - 1 (the periphery adds x_{t-1})
        re = A.real - 1.0 if layout.increment else A.real
        a = np.stack([re, -A.imag, A.imag, re], axis=1)
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


# -- the read-out and the counts -------------------------------------------------
def delayed_readout(config: CrossbarConfig, quantized_state: bool) -> bool:
    """Whether a layer's output rows read the coded state one MVM later (``CrossbarConfig.ssm_readout``;
    "auto": when the layer's state is quantized, as the model then reads C on its quantized state)."""
    return config.ssm_readout == "delayed" or (config.ssm_readout == "auto" and quantized_state)


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
