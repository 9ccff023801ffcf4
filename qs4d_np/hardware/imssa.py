"""IMSSA mapping: an S4D model's matrices on crossbar tiles, run as analog inference.

The recurrence of one channel h with M complex modes is made real: the state
x (M complex) becomes s = [Re x_0, Im x_0, Re x_1, Im x_1, ...] (2M reals),
and each mode's Abar becomes the 2x2 block [[Re a, -Im a], [Im a, Re a]]. One
analog step reads the square matrix (n_h = 2M + 1)

    [ s_t ]   [ blockdiag(Abar)     Bbar                  ] [ s_{t-1} ]
    [ y_t ] = [ 2C*Abar (real row)  2Re(sum C*Bbar) + D   ] [ u_t     ]

Bbar is a single column ([Re b, Im b] per mode) and the output a single row:
y_t = 2Re(C x_t) + D u_t with x_t = Abar x_{t-1} + Bbar u_t, written in
x_{t-1} and u_t so that a single MVM per step gives the new state and the
output together (the row holds C*Abar and C*Bbar + D; Re(w x) = Re w Re x -
Im w Im x gives the entries 2Re(C_m Abar_m), -2Im(C_m Abar_m)). The state and
the output go through the ADC at every step and come back through the DAC.

Packing (ours): the channels' square blocks sit on the block diagonal of an
array, as many consecutive channels per array as fit in ``tile_rows`` x
``tile_cols``; a channel larger than a tile gets an array of its own, tiled by
the crossbar. The unused off-diagonal cells are programmed to zero (and get
programming noise like any cell).

Pruned parts drop out (``qs4d_np.hardware.pruning`` makes them exactly zero):
a mode with C_m = 0 has no effect on any output and is not mapped, a channel
with no mode left and D_h = 0 outputs zero and gets no cells. The rule: a
mode (h, m) is mapped iff C[h, m] != 0; a channel iff it has a mapped mode or
D[h] != 0.

The other matrices: the encoder (d_in -> H, one MVM per time step), each
layer's pointwise mixing Linear (H -> 2H, one MVM per step) and the decoder
(H -> d_out, once per sample) each get their own arrays. Digital: biases,
activation, the GLU gate, norms, residual adds and the pooling over time.
Dropout is off (inference).

A QAT model (``S4DModel(quant=...)``) is programmed with the values its
recurrent mode computes with: the quantized Abar, Bbar, C, D and mixing /
encoder / decoder weights, and its activation quantizer runs digitally after
the GLU. Its state quantizer has no counterpart: the state lives in the
arrays' DAC/ADC codes (``CrossbarConfig``) instead.

Counts (per sample, first-round conversions; bound-management reruns are
counted separately in ``bm_retries``): ADC conversions = L*(H + sum over layers
of (sum_h n_h + 2H)) + d_out; arrays = the crossbar tiles of every programmed
matrix (``mapping_counts`` gives both without running the model: from the shapes and
the modes the quantized C keeps).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from qs4d_np.core.checks import check_array, check_float, check_int, check_sequence_input
from qs4d_np.core.linear import Linear
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.crossbar import CrossbarArray
from qs4d_np.kernels.elementwise import glu_forward
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.weights import WeightQuant
from qs4d_np.ssm.s4d import S4D


# -- the per-channel matrix --------------------------------------------------
def ssm_matrices(ssm: S4D) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(Abar, Bbar, C) (H, M) complex128 and D (H,) float64 of an S4D layer as its recurrent mode uses them:
    the float values, or for a QAT layer the quantized ones (``S4D.effective_ssm``)."""
    eff = ssm.effective_ssm("recurrent")
    return eff.Abar, eff.Bbar, eff.C, eff.D


def active_modes(C: np.ndarray) -> list[np.ndarray]:
    """Per channel, the indices of the modes that are mapped (C[h, m] != 0). C: (H, M) complex."""
    return [np.flatnonzero(row != 0) for row in C]


def channel_matrix(Abar: np.ndarray, Bbar: np.ndarray, C: np.ndarray, D: float) -> np.ndarray:
    """The real (2m + 1) x (2m + 1) step matrix of one channel (see the module docstring).

    Abar, Bbar, C: (m,) complex (the channel's mapped modes); D: the skip.
    Rows and columns: [Re x_0, Im x_0, ..., Re x_{m-1}, Im x_{m-1}, u/y].
    """
    m = Abar.shape[0]
    n = 2 * m + 1
    out = np.zeros((n, n))
    idx = 2 * np.arange(m)
    out[idx, idx] = Abar.real
    out[idx, idx + 1] = -Abar.imag
    out[idx + 1, idx] = Abar.imag
    out[idx + 1, idx + 1] = Abar.real
    out[idx, n - 1] = Bbar.real
    out[idx + 1, n - 1] = Bbar.imag
    CA = C * Abar
    out[n - 1, idx] = 2 * CA.real
    out[n - 1, idx + 1] = -2 * CA.imag
    out[n - 1, n - 1] = 2 * np.sum(C * Bbar).real + D
    return out


def pack_channels(sizes: list[int], tile_rows: int, tile_cols: int) -> list[tuple[int, int]]:
    """Consecutive channel ranges [h0, h1) whose square blocks (sizes[h] each) share one array.

    A range grows while the summed size fits both tile_rows and tile_cols; a
    channel bigger than a tile gets a range of its own (the crossbar tiles it).
    Channels of size 0 are skipped (not mapped).
    """
    limit = min(tile_rows, tile_cols)
    groups: list[tuple[int, int]] = []
    h0, used = None, 0
    for h, n in enumerate(sizes):
        if n == 0:
            if h0 is not None:
                groups.append((h0, h))
                h0, used = None, 0
            continue
        if h0 is not None and used + n > limit:
            groups.append((h0, h))
            h0, used = None, 0
        if h0 is None:
            h0 = h
        used += n
    if h0 is not None:
        groups.append((h0, len(sizes)))
    return groups


def _tiles(rows_in: int, cols_out: int, cfg: CrossbarConfig) -> int:
    return math.ceil(rows_in / cfg.tile_rows) * math.ceil(cols_out / cfg.tile_cols)


@dataclass
class _SSMArrays:
    """One S4D layer on crossbars: the flat real state, the u/y positions and the arrays of each group."""

    d_model: int
    width: int                    # length of the flat state-and-input vector
    io_index: np.ndarray          # (active channels,) positions of u_t in / y_t out
    io_channel: np.ndarray        # (active channels,) the channel of each position
    slices: list[slice]
    arrays: list[CrossbarArray]


@dataclass
class AnalogCounters:
    """What the analog runs used so far."""

    samples: int = 0
    mvms: int = 0
    adc_conversions: int = 0
    adc_clipped: int = 0
    bm_retries: int = 0

    def add(self, array: CrossbarArray, rows: int) -> None:
        self.mvms += 1
        self.adc_conversions += rows * array.out_features
        self.adc_clipped += array.stats.clipped_outputs
        self.bm_retries += array.stats.bm_retries


class AnalogModel:
    """An ``S4DModel`` programmed onto crossbars (``CrossbarConfig``), for inference.

    ``forward(x)`` maps x (batch, length, d_input) to logits (batch, d_output)
    with every matrix product on the arrays and the recurrence streamed one
    step at a time. Programming (and its noise) happens once here, seeded by
    ``seed``; every ``forward`` draws fresh read noise. The model's weights are
    read at construction: reprogram after changing them.

    ``state_bound``: clip the digital state (after the ADC, before the next
    DAC) to +-state_bound at every step, as a fixed-range state register does
    (Zhao et al. clip |x| <= 50). Programming noise moves the eigenvalues of
    the programmed Abar blocks, and modes with |Abar| close to 1 can end up
    growing; with absmax noise management nothing else bounds the state. None
    (default) does not clip, and a state that overflows raises a RuntimeError
    naming the layer and the step instead of returning NaN.
    """

    def __init__(self, model: S4DModel, config: CrossbarConfig, *, seed: int | np.random.Generator = 0,
                 state_bound: float | None = None) -> None:
        if not isinstance(config, CrossbarConfig):
            raise TypeError(f"config must be a CrossbarConfig, got {type(config).__name__}")
        for attr in ("encoder", "blocks", "pool", "decoder"):
            if not hasattr(model, attr):
                raise TypeError(f"model must be an S4DModel (encoder, blocks, pool, decoder), "
                                f"got {type(model).__name__} without .{attr}")
        if not isinstance(seed, np.random.Generator):
            check_int("seed", seed, min_value=0)
        self.state_bound = (None if state_bound is None else
                            check_float("state_bound", state_bound, min_value=0.0, min_inclusive=False))
        self.model = model
        self.config = config
        self.dtype = np.dtype(model.dtype)
        self._rng = np.random.default_rng(seed)
        coder_quant = getattr(model, "coder_quant", {})
        self.encoder = self._program_linear(model.encoder, coder_quant.get("encoder"))
        self.ssm = [self._program_ssm(block.ssm) for block in model.blocks]
        self.mixing = [None if block.ssm.mixing is None else
                       self._program(block.ssm.mixing_weight().T.astype(np.float64)) for block in model.blocks]
        self.decoder = self._program_linear(model.decoder, coder_quant.get("decoder"))
        self.counters = AnalogCounters()

    # -- programming ---------------------------------------------------------
    def _program(self, W: np.ndarray) -> CrossbarArray:
        return CrossbarArray(W, self.config, self._rng.spawn(1)[0])

    def _program_linear(self, linear: Linear, weight_quant: WeightQuant | None = None) -> CrossbarArray:
        W = linear.weight
        if weight_quant is not None:  # a QAT model: program the weight it computes with
            W = weight_quant.quantizer.forward(W, training=False)
        return self._program(W.T.astype(np.float64))

    def _program_ssm(self, ssm: S4D) -> _SSMArrays:
        Abar, Bbar, C, D = ssm_matrices(ssm)
        modes = active_modes(C)
        sizes = [2 * len(m) + 1 if (len(m) or D[h] != 0) else 0 for h, m in enumerate(modes)]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        mapped = [h for h, n in enumerate(sizes) if n]
        slices, arrays = [], []
        for h0, h1 in pack_channels(sizes, self.config.tile_rows, self.config.tile_cols):
            lo, hi = int(offsets[h0]), int(offsets[h1])
            W = np.zeros((hi - lo, hi - lo))
            for h in range(h0, h1):
                a, b = int(offsets[h]) - lo, int(offsets[h + 1]) - lo
                m = modes[h]
                W[a:b, a:b] = channel_matrix(Abar[h, m], Bbar[h, m], C[h, m], D[h])
            slices.append(slice(lo, hi))
            arrays.append(self._program(W))
        io_index = np.array([offsets[h + 1] - 1 for h in mapped], dtype=np.int64)
        return _SSMArrays(ssm.d_model, int(offsets[-1]), io_index, np.array(mapped, dtype=np.int64),
                          slices, arrays)

    @property
    def arrays(self) -> list[CrossbarArray]:
        """Every programmed matrix, encoder first."""
        out = [self.encoder]
        for layer, mixing in zip(self.ssm, self.mixing):
            out.extend(layer.arrays)
            if mixing is not None:
                out.append(mixing)
        return out + [self.decoder]

    @property
    def n_tiles(self) -> int:
        """Physical arrays (crossbar tiles) used."""
        return sum(len(a.tiles) for a in self.arrays)

    # -- inference -----------------------------------------------------------
    def _mvm(self, array: CrossbarArray, x: np.ndarray) -> np.ndarray:
        y = array.mvm(x)
        self.counters.add(array, x.shape[0])
        return y

    def _linear(self, array: CrossbarArray, linear: Linear, x: np.ndarray) -> np.ndarray:
        """x (..., d_in) -> analog x @ weight + digital bias."""
        y = self._mvm(array, x.reshape(-1, x.shape[-1])).astype(self.dtype)
        if linear.bias is not None:
            y += linear.bias
        return y.reshape(*x.shape[:-1], -1)

    def _recurrence(self, i: int, u: np.ndarray) -> np.ndarray:
        """u (batch, length, H) -> layer i's SSM output y (batch, length, H), one analog step per time step."""
        layer = self.ssm[i]
        batch, length, H = u.shape
        y = np.zeros((batch, length, H), dtype=self.dtype)
        z = np.zeros((batch, layer.width))
        for t in range(length):
            z[:, layer.io_index] = u[:, t, layer.io_channel]
            z_new = np.empty_like(z)
            for sl, array in zip(layer.slices, layer.arrays):
                z_new[:, sl] = self._mvm(array, np.ascontiguousarray(z[:, sl]))
            if self.state_bound is not None:
                np.clip(z_new, -self.state_bound, self.state_bound, out=z_new)
            elif not np.isfinite(z_new).all():
                raise RuntimeError(
                    f"the analog recurrence of layer {i} overflowed at step {t}: the programmed Abar blocks "
                    "let the state grow (programming noise on modes with |Abar| near 1?); pass state_bound "
                    "to clip the state, or use less programming noise")
            z = z_new
            y[:, t, layer.io_channel] = z[:, layer.io_index]
        return y

    def _ssm_block(self, i: int, u: np.ndarray) -> np.ndarray:
        ssm = self.model.blocks[i].ssm
        y = self._recurrence(i, u)
        if ssm.activation is not None:
            y = ssm.activation.forward(y, training=False)
        if self.mixing[i] is not None:
            linear = ssm.mixing.linear
            z = self._mvm(self.mixing[i], y.reshape(-1, y.shape[-1])).astype(self.dtype)
            out = np.empty((z.shape[0], ssm.d_model), dtype=self.dtype)
            glu_forward(z, linear.bias, out, np.empty_like(out))
            y = out.reshape(y.shape)
        if ssm.act_quantizer is not None:  # QAT: the digital activation quantizer
            y = ssm.act_quantizer.forward(y, training=False)
        return y

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (batch, length, d_input) -> logits (batch, d_output) computed on the arrays."""
        x = check_sequence_input("x", x, self.model.d_input)
        h = self._linear(self.encoder, self.model.encoder, x.astype(self.dtype, copy=False))
        for i, block in enumerate(self.model.blocks):
            z = h
            if block.prenorm and block.norm is not None:
                z = block.norm.forward(z, training=False)
            z = self._ssm_block(i, z)
            if block.residual:
                z = z + h
            if not block.prenorm and block.norm is not None:
                z = block.norm.forward(z, training=False)
            h = z
        pooled = self.model.pool.forward(h, training=False)
        self.counters.samples += x.shape[0]
        return self._linear(self.decoder, self.model.decoder, pooled)


def mapping_counts(model: S4DModel, config: CrossbarConfig, length: int) -> dict[str, int]:
    """Arrays (tiles) and ADC conversions per sample of the mapping, from the shapes and the (quantized) C, D
    the recurrent mode computes with (``S4D.effective_ssm``)."""
    length = check_int("length", length, min_value=1)
    H = model.encoder.d_out
    tiles = _tiles(model.d_input, H, config) + _tiles(H, model.d_output, config)
    conversions = length * H + model.d_output
    for block in model.blocks:
        ssm = block.ssm
        _, _, C, D = ssm_matrices(ssm)  # a QAT C quantized to 0 maps no mode, as in AnalogModel
        sizes = [2 * len(m) + 1 if (len(m) or D[h] != 0) else 0 for h, m in enumerate(active_modes(C))]
        for h0, h1 in pack_channels(sizes, config.tile_rows, config.tile_cols):
            n = sum(sizes[h0:h1])
            tiles += _tiles(n, n, config)
        conversions += length * sum(sizes)
        if ssm.mixing is not None:
            tiles += _tiles(H, 2 * H, config)
            conversions += length * 2 * H
    return {"arrays": tiles, "adc_conversions_per_sample": conversions}


def evaluate_analog(model: S4DModel, x: np.ndarray, y: np.ndarray, config: CrossbarConfig, *, batch_size: int = 64,
                    seed: int = 0, state_bound: float | None = None) -> dict[str, Any]:
    """Accuracy of ``model`` run on crossbars (``AnalogModel``) over x (n, length, d_input), labels y (n,).

    Returns accuracy, samples, arrays (tiles), adc_conversions (total, first
    rounds), adc_clipped, bm_retries, mvms, seconds and samples_per_s (the
    inference alone, programming excluded). Programming and read noise are
    seeded by ``seed``: same seed, same result. ``state_bound``: see ``AnalogModel``.
    """
    x = check_sequence_input("x", x, model.d_input)
    y = check_array("y", y, ndim=1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) (one label per sequence of x), got {y.shape}")
    if y.dtype.kind not in "iu":
        raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= model.d_output):
        raise ValueError(f"y must hold labels in 0..{model.d_output - 1}, got values in {y.min()}..{y.max()}")
    batch_size = check_int("batch_size", batch_size, min_value=1)
    check_int("seed", seed, min_value=0)
    analog = AnalogModel(model, config, seed=seed, state_bound=state_bound)
    correct = 0
    start = time.perf_counter()
    for lo in range(0, x.shape[0], batch_size):
        logits = analog.forward(x[lo:lo + batch_size])
        correct += int(np.count_nonzero(np.argmax(logits, axis=1) == y[lo:lo + batch_size]))
    seconds = time.perf_counter() - start
    c = analog.counters
    return {"accuracy": correct / x.shape[0], "samples": c.samples, "arrays": analog.n_tiles,
            "adc_conversions": c.adc_conversions, "adc_clipped": c.adc_clipped, "bm_retries": c.bm_retries,
            "mvms": c.mvms, "seconds": seconds, "samples_per_s": c.samples / seconds if seconds > 0 else float("inf")}
