"""``CrossbarConfig``: every knob of the simulated analog crossbar, validated strictly.

Three presets, chosen so that noise is never on by surprise (aihwkit's users
complain that noise is on by default and that changed settings are silently
ignored):

* ``CrossbarConfig()``: the aihwkit-like converters and mapping (7-bit DAC over
  [-1, 1], 9-bit ADC over [-12, 12], absmax noise management, iterative bound
  management, g_max = 25 uS, 256 x 256 tiles) but **every noise source at 0**.
  The result is deterministic and still shows the quantization and clipping
  of a real array.
* ``CrossbarConfig.realistic()``: the same plus aihwkit's inference noise:
  output read noise 0.06 and the PCM programming-noise model.
* ``CrossbarConfig.ideal()``: no converters, no noise, no clipping: the
  crossbar computes the float matmul (up to rounding).

Converter ranges. Without calibration every array shares the DAC range
``inp_bound`` and the ADC range ``out_bound``, and absmax noise management
rescales each input vector. With calibration (``qs4d_np.hardware.to_analog(...,
calib=batches)``) each array gets digital input scales and ADC ranges from data:
per input (column) and per output, or pooled per array and part
(``calib_granularity``), by the rule ``calib_rule`` (``CALIB_RULES``) times
``calib_margin``; see ``qs4d_np.hardware.calibration``. ``weight_scaling``
"output" maps every output's weights to the full conductance range, with a
digital scale per output (aihwkit's channel-wise remapping); "tensor" uses one
absmax per matrix.

Drift (PCM, SPEC.md section 4): ``t_inference`` seconds after programming
(0 = off, exactly: nothing is drawn), each device's conductance decays as
((t + t0)/t0)^-nu with its own drift exponent nu, plus accumulated 1/f read
noise; ``drift_compensation`` rescales each array's outputs by one global
factor measured on a fixed read-out input (``qs4d_np.hardware.conductance``).

Units. Inputs are normalized to the DAC range, weights to conductance / g_max
(so |w| <= 1), and outputs ``y_norm = sum_j x_j * w_ij`` live in those units;
``out_bound``, ``out_noise`` and ``w_noise`` are in them (aihwkit's convention).
A converter with ``b`` bits has symmetric codes -(2^(b-1)-1)..2^(b-1)-1 over
[-bound, bound], i.e. a step of 2*bound/(2^b - 2): 7 bits over [-1, 1] is
aihwkit's inp_res = 1/126 (codes -63..63), 9 bits over [-12, 12] its
out_res = 1/510. Rounding is half to even everywhere.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from qs4d_np.core.checks import check_choice, check_float, check_int
from qs4d_np.io import atomic_write_json, load_json

NOISE_MANAGEMENT = ("absmax", "none")
W_NOISE_TYPES = ("additive", "proportional")
PROG_NOISE_TYPES = ("pcm", "gaussian")
DTYPES = ("float32", "float64")
WEIGHT_SCALINGS = ("tensor", "output")
CALIB_RULES = ("max", "percentile")
CALIB_GRANULARITIES = ("column", "array")
STATE_GRIDS = ("calibrated", "model")
SSM_READOUTS = ("auto", "direct", "delayed")
STATE_UPDATES = ("full", "increment")
# PCM programming noise sigma(g) = g_max/25 * (c0 + c1*(g/g_max) + c2*(g/g_max)^2)
PCM_COEFFS = (0.26348, 1.9650, -1.1731)


@dataclass(frozen=True)
class CrossbarConfig:
    """Settings of a simulated crossbar; see the module docstring for units.

    Converters: ``dac_bits`` / ``adc_bits`` (None = no quantization),
    ``inp_bound`` / ``out_bound`` (None = no clipping; a converter needs a bound).
    ``noise_management``: "absmax" scales each input vector by its absmax
    before the DAC and back after the ADC; "none" feeds x as is.
    ``bound_management``: when an output of a tile clips at the ADC, rerun that
    input vector on that tile with the input halved, up to ``bm_max_rounds`` times.
    Read noise, redrawn at every MVM: ``out_noise`` (std of a Gaussian added to
    every output before the ADC) and ``w_noise`` with ``w_noise_type``
    "additive" (std w_noise*||x||_2 per output, i.e. fresh N(0, w_noise) weight
    noise) or "proportional" (std w_noise*sqrt(sum_j |w_ij| x_j^2)).
    Programming noise, drawn once in ``program``: ``prog_noise`` scales either
    the PCM model (``prog_noise_type`` "pcm", coefficients ``pcm_coeffs``) or a
    Gaussian with std prog_noise*g_max ("gaussian"). Conductances: ``g_max``
    (uS, > 0) and ``g_levels`` (number of programmable levels in [0, g_max],
    None = continuous). ``ir_drop``: wire resistance of one crossbar segment
    times g_max (dimensionless, 0 = off), see ``qs4d_np.hardware.conductance``.
    Tiles: at most ``tile_rows`` inputs x ``tile_cols`` outputs per array; a
    larger matrix is split when ``tiling`` is True and refused otherwise.
    ``dtype``: the float type of the analog product (float32 is exact for
    integer codes and levels as long as every partial sum stays below 2^24).
    ``weight_scaling``, ``calib_*``, ``t_inference``, ``drift_compensation``: see the
    module docstring. ``bits_from_model``: the SSM arrays of a layer whose state is
    quantized take the state's width for their DAC and ADC (the other arrays keep
    ``dac_bits`` / ``adc_bits``). ``state_grid``: "calibrated" (the state lines' ranges from
    the calibration data, like every other line) or "model": a layer whose state quantizer
    has a static range gives the state lines its grid, per channel and part: the state rows'
    ADC rounds onto the quantizer's step (extra ADC bits widen its range) and a DAC as wide
    as the state codes that value exactly, so the arrays quantize the state as the digital
    recurrence does (needs ``noise_management`` "none", which keeps the grid fixed, and
    calibration for the other lines). ``ssm_readout``: where an SSM array's output row reads
    the state (``qs4d_np.hardware.imssa_layout``): "direct" reads y_t = 2Re(C x_t) + D u_t in the
    same MVM as the state update, from x_{t-1} and u_t (C Abar, C Bbar + D: the unquantized
    new state); "delayed" reads it one MVM later from the coded state x_t on the state lines
    and u_t on an extra input line per channel (y_t on the state's own grid, as a model with a
    quantized state computes it; one more input line per channel and one more MVM per
    sequence); "auto" (default): "delayed" for a layer whose state is quantized, else "direct".
    ``state_update``: what an SSM array's state rows compute (``qs4d_np.hardware.imssa_layout``):
    "full" (default) the new state Abar x + Bbar u; "increment" the change (Abar - I) x + Bbar u,
    which the periphery adds to the state it holds, so that the cells' programming and read errors
    scale with |Abar - I| (small for slowly decaying modes) instead of |Abar| ~ 1 (most useful
    with ``weight_scaling`` "output"; on the model's state grid the sum is the same grid point).
    """

    dac_bits: int | None = 7
    inp_bound: float | None = 1.0
    adc_bits: int | None = 9
    out_bound: float | None = 12.0
    noise_management: str = "absmax"
    bound_management: bool = True
    bm_max_rounds: int = 10
    out_noise: float = 0.0
    w_noise: float = 0.0
    w_noise_type: str = "additive"
    prog_noise: float = 0.0
    prog_noise_type: str = "pcm"
    pcm_coeffs: tuple[float, float, float] = PCM_COEFFS
    g_max: float = 25.0
    g_levels: int | None = None
    ir_drop: float = 0.0
    tile_rows: int = 256
    tile_cols: int = 256
    tiling: bool = True
    dtype: str = "float32"
    weight_scaling: str = "tensor"
    calib_rule: str = "max"
    calib_percentile: float = 99.9
    calib_granularity: str = "column"
    calib_margin: float = 1.0
    bits_from_model: bool = False
    state_grid: str = "calibrated"
    ssm_readout: str = "auto"
    state_update: str = "full"
    t_inference: float = 0.0
    drift_compensation: bool = True

    # -- presets -----------------------------------------------------------
    @classmethod
    def ideal(cls, **overrides: Any) -> "CrossbarConfig":
        """Everything off: the crossbar returns the float matmul up to rounding."""
        base = dict(dac_bits=None, inp_bound=None, adc_bits=None, out_bound=None,
                    noise_management="none", bound_management=False)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def realistic(cls, **overrides: Any) -> "CrossbarConfig":
        """aihwkit-like inference defaults: the converters plus read noise 0.06 and PCM programming noise."""
        base: dict[str, Any] = dict(out_noise=0.06, prog_noise=1.0, prog_noise_type="pcm")
        base.update(overrides)
        return cls(**base)

    # -- validation --------------------------------------------------------
    def __post_init__(self) -> None:
        for name in ("dac_bits", "adc_bits"):
            value = getattr(self, name)
            if value is not None:
                # b bits give 2^b - 1 symmetric codes; b = 1 would leave only code 0
                check_int(f"CrossbarConfig.{name}", value, min_value=2, max_value=24)
        for name in ("inp_bound", "out_bound"):
            value = getattr(self, name)
            if value is not None:
                self._set(name, check_float(f"CrossbarConfig.{name}", value, min_value=0.0, min_inclusive=False))
        if self.dac_bits is not None and self.inp_bound is None:
            raise ValueError("CrossbarConfig.inp_bound must be set when dac_bits is set (the DAC's full scale)")
        if self.adc_bits is not None and self.out_bound is None:
            raise ValueError("CrossbarConfig.out_bound must be set when adc_bits is set (the ADC's full scale)")
        check_choice("CrossbarConfig.noise_management", self.noise_management, NOISE_MANAGEMENT)
        check_choice("CrossbarConfig.w_noise_type", self.w_noise_type, W_NOISE_TYPES)
        check_choice("CrossbarConfig.prog_noise_type", self.prog_noise_type, PROG_NOISE_TYPES)
        check_choice("CrossbarConfig.dtype", self.dtype, DTYPES)
        check_choice("CrossbarConfig.weight_scaling", self.weight_scaling, WEIGHT_SCALINGS)
        check_choice("CrossbarConfig.calib_rule", self.calib_rule, CALIB_RULES)
        check_choice("CrossbarConfig.calib_granularity", self.calib_granularity, CALIB_GRANULARITIES)
        check_choice("CrossbarConfig.state_grid", self.state_grid, STATE_GRIDS)
        check_choice("CrossbarConfig.ssm_readout", self.ssm_readout, SSM_READOUTS)
        check_choice("CrossbarConfig.state_update", self.state_update, STATE_UPDATES)
        if self.state_grid == "model" and self.noise_management != "none":
            raise ValueError("CrossbarConfig.state_grid='model' needs noise_management='none': absmax noise "
                             "management rescales every input vector, which moves the state's grid")
        self._set("calib_percentile", check_float("CrossbarConfig.calib_percentile", self.calib_percentile,
                                                  min_value=0.0, max_value=100.0, min_inclusive=False))
        self._set("calib_margin", check_float("CrossbarConfig.calib_margin", self.calib_margin,
                                              min_value=0.0, min_inclusive=False))
        self._set("t_inference", check_float("CrossbarConfig.t_inference", self.t_inference, min_value=0.0))
        for name in ("bound_management", "tiling", "bits_from_model", "drift_compensation"):
            if not isinstance(getattr(self, name), bool):
                value = getattr(self, name)
                raise TypeError(f"CrossbarConfig.{name} must be a bool, got {value!r} ({type(value).__name__})")
        check_int("CrossbarConfig.bm_max_rounds", self.bm_max_rounds, min_value=0, max_value=60)
        for name in ("out_noise", "w_noise", "prog_noise", "ir_drop"):
            self._set(name, check_float(f"CrossbarConfig.{name}", getattr(self, name), min_value=0.0))
        self._set("g_max", check_float("CrossbarConfig.g_max", self.g_max, min_value=0.0, min_inclusive=False))
        if self.g_levels is not None:
            check_int("CrossbarConfig.g_levels", self.g_levels, min_value=2, max_value=2**24)
        for name in ("tile_rows", "tile_cols"):
            check_int(f"CrossbarConfig.{name}", getattr(self, name), min_value=1)
        coeffs = self.pcm_coeffs
        if not isinstance(coeffs, (tuple, list)) or len(coeffs) != 3:
            raise TypeError(f"CrossbarConfig.pcm_coeffs must be 3 numbers (c0, c1, c2), got {coeffs!r}")
        self._set("pcm_coeffs", tuple(check_float(f"CrossbarConfig.pcm_coeffs[{i}]", c)
                                      for i, c in enumerate(coeffs)))

    def _set(self, name: str, value: Any) -> None:
        # frozen dataclass: normalise validated values (int -> float, list -> tuple)
        object.__setattr__(self, name, value)

    # -- derived converter constants ------------------------------------------
    @property
    def inp_step(self) -> float:
        """DAC step in normalized input units (1.0 when there is no DAC)."""
        return _step(self.dac_bits, self.inp_bound)

    @property
    def inp_qmax(self) -> int:
        """Largest DAC code, 2^(b-1) - 1 (0 when there is no DAC)."""
        return _qmax(self.dac_bits)

    @property
    def out_step(self) -> float:
        """ADC step in normalized output units (1.0 when there is no ADC)."""
        return _step(self.adc_bits, self.out_bound)

    @property
    def out_qmax(self) -> int:
        """Largest ADC code, 2^(b-1) - 1 (0 when there is no ADC)."""
        return _qmax(self.adc_bits)

    @property
    def has_read_noise(self) -> bool:
        return self.out_noise > 0.0 or self.w_noise > 0.0

    def with_bits(self, dac_bits: int | None, adc_bits: int | None) -> "CrossbarConfig":
        """This config with other converter widths (``bits_from_model``); the ranges stay."""
        return dataclasses.replace(self, dac_bits=dac_bits, adc_bits=adc_bits)


    # -- JSON ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["pcm_coeffs"] = list(self.pcm_coeffs)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CrossbarConfig":
        """Build from a mapping; unknown keys are an error (never silently ignored)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"CrossbarConfig.from_dict needs a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CrossbarConfig key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**dict(data))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CrossbarConfig":
        return cls.from_dict(load_json(path))


def _step(bits: int | None, bound: float | None) -> float:
    """Converter step: 2*bound over 2^b - 2 intervals (symmetric codes); 1.0 without a converter."""
    return 1.0 if bits is None else 2.0 * bound / (2 ** bits - 2)


def _qmax(bits: int | None) -> int:
    return 0 if bits is None else 2 ** (bits - 1) - 1
