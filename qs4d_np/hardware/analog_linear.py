"""``AnalogLinear``: a Linear whose product x @ W runs on a programmed crossbar, for inference.

``hardware.to_analog`` puts one in place of the encoder, every mixing Linear and the decoder.
The bias is added digitally (``Linear.forward``); a mixing's GLU and everything after it stay
the model's own ops. The array holds the weight the digital forward computes with (quantized
for a QAT model); its parameters stay the digital ones, shared, so the model keeps its names.
"""
from __future__ import annotations

import numpy as np

from qs4d_np.core.linear import Linear
from qs4d_np.core.module import Module
from qs4d_np.hardware.calibration import RangeRecorder, column_groups
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.crossbar import CrossbarArray
from qs4d_np.hardware.imssa import AnalogCounters


class AnalogLinear(Linear):
    """y = x @ W (on the crossbar) + bias (digital) for x (..., d_in); inference only.

    ``linear``: the digital Linear it replaces (its parameters are shared); ``W`` (d_in, d_out):
    the weight to program; ``rng``: programming noise and every MVM's read-noise key.
    ``program()`` programs the array with the calibrated ranges, if any (``in_range``,
    ``out_range``); ``start_calibration`` / ``finish_calibration`` run a calibration phase
    (``qs4d_np.hardware.calibration``), during which the product is exact.
    """

    def __init__(self, linear: Linear, W: np.ndarray, config: CrossbarConfig, rng: np.random.Generator) -> None:
        Module.__init__(self)
        self.d_in, self.d_out, self.dtype = linear.d_in, linear.d_out, linear.dtype
        self._params = dict(linear.params)  # the same arrays
        self.target = np.asarray(W, dtype=np.float64)
        if self.target.shape != (self.d_in, self.d_out):
            raise ValueError(f"W must have shape ({self.d_in}, {self.d_out}), got {self.target.shape}")
        self.config = config
        self._rng = rng
        self.in_range: np.ndarray | None = None
        self.out_range: np.ndarray | None = None
        self.array: CrossbarArray | None = None
        self.counters = AnalogCounters()
        self._recorder: RangeRecorder | None = None

    @property
    def n_tiles(self) -> int:
        return 0 if self.array is None else len(self.array.tiles)

    def program(self) -> None:
        """Program the array (programming noise and drift drawn from the part's generator)."""
        out_range = self.out_range if self.config.out_bound is not None else None
        self.array = CrossbarArray(self.target.T, self.config, self._rng, in_range=self.in_range,
                                   out_range=out_range)

    # -- calibration ---------------------------------------------------------------
    def start_calibration(self, phase: str) -> None:
        self._recorder = RangeRecorder(phase, self.d_in, self.d_out)

    def finish_calibration(self) -> None:
        rec, self._recorder = self._recorder, None
        if rec is None:
            raise RuntimeError("finish_calibration() without start_calibration()")
        cfg = self.config
        if rec.phase == "inputs":
            r = rec.ranges(column_groups(np.zeros(self.d_in, np.int64), cfg.calib_granularity), cfg)
            self.in_range = np.where(r > 0, r / (cfg.inp_bound or 1.0), 1.0)
        else:
            R = rec.ranges(column_groups(np.zeros(self.d_out, np.int64), cfg.calib_granularity), cfg)
            self.out_range = np.where(R > 0, R, cfg.out_bound or 1.0)

    def _record(self, x2: np.ndarray, n_seq: int) -> None:
        """Per-sequence maxima of the inputs ("inputs") or of the normalized outputs the ADC will see."""
        rec = self._recorder
        inputs, outputs = rec.new(n_seq)
        x = x2.astype(np.float64)
        if rec.phase == "inputs":
            inputs[...] = np.abs(x).reshape(n_seq, -1, self.d_in).max(axis=1)
        else:
            cfg = self.config
            r = self.in_range if self.in_range is not None else np.ones(self.d_in)
            W = self.target * r[:, None]
            if cfg.weight_scaling == "output":
                w = np.abs(W).max(axis=0)
                W = W / np.where(w > 0, w, 1.0)
            else:
                W = W / max(float(np.abs(W).max()), np.finfo(float).tiny)
            xs = x / r
            if cfg.noise_management == "absmax":
                m = np.abs(xs).max(axis=1, keepdims=True) / (cfg.inp_bound or 1.0)
                xs = xs / np.where(m > 0, m, 1.0)
            outputs[...] = np.abs(xs @ W).reshape(n_seq, -1, self.d_out).max(axis=1)
        rec.add(inputs, outputs)

    # -- inference -------------------------------------------------------------
    def product(self, x2: np.ndarray, n_seq: int | None = None) -> np.ndarray:
        """x2 (rows, d_in) -> the array's x2 @ W (rows, d_out) in the layer's dtype (exact while calibrating)."""
        n_seq = x2.shape[0] if n_seq is None else n_seq
        if self._recorder is not None:
            self._record(x2, n_seq)
            return (x2.astype(np.float64) @ self.target).astype(self.dtype)
        if self.array is None:
            raise RuntimeError("AnalogLinear.product before program(): build analog models with hardware.to_analog")
        y = self.array.mvm(x2)
        stats = self.array.stats
        rows = x2.shape[0]
        self.counters.add(AnalogCounters(0, rows, rows * self.d_out, stats.clipped_outputs, stats.bm_retries, 0))
        return y.astype(self.dtype)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        raise RuntimeError("an analog Linear has no backward: train the digital model, then convert it")
