"""Converter ranges from calibration data: the rule and the pooling, shared by every analog part.

An analog part (``AnalogLinear``, ``AnalogSSMCore``) records, over calibration batches and per
sequence, the largest |value| each line carries: inputs before the DAC (phase "inputs") and
outputs before the ADC in normalized units (phase "outputs", run after the input scales are
set, since they change the outputs the ADC sees). A range is then

    rule over sequences of (the per-sequence maximum, pooled over the line's group) * calib_margin

with ``calib_rule`` "max" (the largest seen: nothing in the calibration data clips) or
"percentile" (``calib_percentile`` of the per-sequence maxima: robust to a few outlying
sequences, which then clip or go through bound management). ``calib_granularity`` "column"
gives every line its own range; "array" pools the lines of one array and kind (the state
lines, the input lines, the output lines), as a chip with one range per array and part does.
The values are recorded from the exact computation (the intended weights, ideal converters),
so the ranges depend on the calibration batches only: the same batches give the same ranges.
"""
from __future__ import annotations

import numpy as np

from qs4d_np.hardware.config import CrossbarConfig

PHASES = ("inputs", "outputs")


def column_groups(group_of_line: np.ndarray, granularity: str) -> np.ndarray:
    """The pooling group of every line: its own ("column") or ``group_of_line`` ("array")."""
    return np.arange(group_of_line.shape[0]) if granularity == "column" else np.asarray(group_of_line)


def calibrated_range(per_seq_max: np.ndarray, groups: np.ndarray, config: CrossbarConfig) -> np.ndarray:
    """Ranges (n,) from per-sequence maxima (n_seq, n) of |value| and line groups (n,) (module
    docstring); a line that never carried a nonzero value gets 0 (the caller picks a default)."""
    if per_seq_max.ndim != 2 or per_seq_max.shape[0] == 0:
        raise ValueError(f"calibration recorded no sequence (per-sequence maxima of shape {per_seq_max.shape})")
    ids, inverse = np.unique(groups, return_inverse=True)
    pooled = np.zeros((per_seq_max.shape[0], ids.shape[0]))
    for g in range(ids.shape[0]):
        pooled[:, g] = per_seq_max[:, inverse == g].max(axis=1)
    if config.calib_rule == "max":
        value = pooled.max(axis=0)
    else:
        value = np.percentile(pooled, config.calib_percentile, axis=0)
    return value[inverse] * config.calib_margin


class RangeRecorder:
    """Per-sequence maxima of one part's input lines (n_in) and output lines (n_out) in one phase."""

    def __init__(self, phase: str, n_in: int, n_out: int) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.phase, self.n_in, self.n_out = phase, n_in, n_out
        self._inputs: list[np.ndarray] = []
        self._outputs: list[np.ndarray] = []

    def new(self, n_seq: int) -> tuple[np.ndarray, np.ndarray]:
        """Zeroed (inputs (n_seq, n_in), outputs (n_seq, n_out)) for one batch to fill."""
        return np.zeros((n_seq, self.n_in)), np.zeros((n_seq, self.n_out))

    def add(self, inputs: np.ndarray, outputs: np.ndarray) -> None:
        self._inputs.append(inputs)
        self._outputs.append(outputs)

    def ranges(self, groups: np.ndarray, config: CrossbarConfig) -> np.ndarray:
        """This phase's ranges: of the inputs ("inputs") or of the outputs ("outputs")."""
        parts = self._inputs if self.phase == "inputs" else self._outputs
        n = self.n_in if self.phase == "inputs" else self.n_out
        data = np.concatenate(parts) if parts else np.zeros((0, n))
        return calibrated_range(data, groups, config)
