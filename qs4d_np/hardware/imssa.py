"""IMSSA mapping: one S4D layer's recurrence on crossbar arrays (``AnalogSSMCore``).

The mapping (a channel's real step matrix with its direct and delayed read-outs, the cells that
hold a device, the packing of channels onto arrays, what pruning drops, the counts) is
``qs4d_np.hardware.imssa_layout``; programming the cells and the converters is
``qs4d_np.hardware.imssa_program``. This module is the Module that runs them: the forward, the
streaming step (``AnalogCoreStep``) and the calibration hooks.

A QAT layer is programmed with the values its recurrent mode computes with (the
quantized Abar, Bbar, C, D: ``S4D.effective_ssm``). Its state quantizer has no
counterpart: the state lives in the arrays' ADC and DAC codes (with
``CrossbarConfig.bits_from_model``, at the state quantizer's width).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from qs4d_np.core.checks import check_float, check_sequence_input
from qs4d_np.core.module import Module
from qs4d_np.hardware.calibration import RangeRecorder, column_groups
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.imssa_kernel import NOISE_NONE
from qs4d_np.hardware.imssa_layout import (Cells, IMSSALayout, active_modes, channel_matrix, delayed_readout,
                                           mapping_counts, pack_channels, tiles)
from qs4d_np.hardware.imssa_program import ProgrammedIMSSA, Ranges, program_layer
from qs4d_np.ssm.core import STATIC_SCALE_MODES, S4DCore
from qs4d_np.ssm.params import SSMParams

# The layout and the programming lived in this module before imssa_layout and imssa_program:
# their public names are still importable from here.
__all__ = ["STATE_HEADROOM", "AnalogCoreStep", "AnalogCounters", "AnalogSSMCore",
           "Cells", "IMSSALayout", "ProgrammedIMSSA", "Ranges", "active_modes", "channel_matrix", "delayed_readout",
           "mapping_counts", "pack_channels", "program_layer", "tiles"]

# Default state register: this many times the largest calibrated state range of the layer.
STATE_HEADROOM = 16.0


# -- the analog core -----------------------------------------------------------
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
