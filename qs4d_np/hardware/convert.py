"""``to_analog``: a model's analog twin by module substitution, its calibration, its evaluation.

As in the analog simulators users know (aihwkit's ``convert_to_analog``), conversion copies
the model and puts crossbar-backed parts in place of its matrix products:

* the encoder, every layer's mixing Linear and the decoder -> ``AnalogLinear``;
* every layer's SSM core -> ``AnalogSSMCore`` (the IMSSA step: 2x2 Abar blocks, the Bbar
  column, the output row, ``qs4d_np.hardware.imssa_layout``).

Everything else is the model's own: its forward and streaming step, the GLU, norms,
residual, pooling and activation quantizers run digitally as they always do. The parts are
programmed with the values the digital recurrent forward computes with (quantized for a QAT
model), once, from ``seed``; each forward draws fresh read noise.

Calibration (``calib``: input sequences, e.g. a few training batches) runs the copy twice
with exact arithmetic, recording the inputs and then the outputs of every array, sets each
array's DAC and ADC ranges (``qs4d_np.hardware.calibration``) and only then programs the
arrays. Without it the config's common ranges and absmax noise management apply.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import numpy as np

from qs4d_np.core.checks import check_int, check_labeled, check_sequence_input
from qs4d_np.core.snapshot import snapshot
from qs4d_np.hardware.analog_linear import AnalogLinear
from qs4d_np.hardware.calibration import PHASES
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.imssa import AnalogCounters, AnalogSSMCore
from qs4d_np.models.s4d_model import S4DModel

AnalogPart = AnalogLinear | AnalogSSMCore


def _batches(x: np.ndarray, batch_size: int) -> Iterable[np.ndarray]:
    for lo in range(0, x.shape[0], batch_size):
        yield x[lo:lo + batch_size]


def analog_parts(model: S4DModel) -> list[AnalogPart]:
    """The crossbar-backed parts of a converted model, encoder first (module order)."""
    return [m for _, m in model.modules() if isinstance(m, (AnalogLinear, AnalogSSMCore))]


def to_analog(model: S4DModel, config: CrossbarConfig, seed: int | np.random.Generator = 0,
              calib: np.ndarray | Sequence[np.ndarray] | None = None, *, state_bound: float | None = None,
              batch_size: int = 64) -> S4DModel:
    """A copy of ``model`` whose matrix products run on crossbars programmed with ``config``.

    ``calib``: (n, length, d_input) sequences, or a sequence of such batches, to calibrate the
    converter ranges on (``calibrate``); ``batch_size`` splits an array. ``state_bound``: the
    SSM state registers' bound (``AnalogSSMCore``). The model itself is not changed.
    """
    if not isinstance(model, S4DModel):
        raise TypeError(f"model must be an S4DModel, got {type(model).__name__}")
    if not isinstance(config, CrossbarConfig):
        raise TypeError(f"config must be a CrossbarConfig (CrossbarConfig.from_dict reads a dict), "
                        f"got {type(config).__name__}")
    if not isinstance(seed, np.random.Generator):
        check_int("seed", seed, min_value=0)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    batches = None if calib is None else _calib_batches(calib, model.d_input, batch_size)
    if batches is None and config.state_grid == "model":
        raise ValueError("CrossbarConfig.state_grid='model' sets the state lines during calibration: pass calib")
    rng = np.random.default_rng(seed)
    analog = snapshot(model)
    streams = iter(rng.spawn(2 + 2 * len(analog.blocks)))
    analog.replace_child("encoder", AnalogLinear(analog.encoder, model.frozen_coder("encoder").weight, config,
                                                 next(streams)))
    for block, original in zip(analog.blocks, model.blocks):
        layer = block.ssm
        layer.replace_child("core", AnalogSSMCore(layer.core, config, next(streams), state_bound=state_bound))
        mixing_rng = next(streams)
        if layer.mixing is not None:
            layer.mixing.replace_child("linear", AnalogLinear(layer.mixing.linear, original.ssm.mixing_weight(),
                                                              config, mixing_rng))
    analog.replace_child("decoder", AnalogLinear(analog.decoder, model.frozen_coder("decoder").weight, config,
                                                 next(streams)))
    if batches is not None:
        calibrate(analog, batches)
    for part in analog_parts(analog):
        part.program()
    return analog


def _calib_batches(calib: Any, d_input: int, batch_size: int) -> list[np.ndarray]:
    if isinstance(calib, np.ndarray):
        x = check_sequence_input("calib", calib, d_input)
        return list(_batches(x, batch_size))
    if not isinstance(calib, (list, tuple)) or not calib:
        raise TypeError(f"calib must be an array (n, length, {d_input}) or a non-empty list of such batches, "
                        f"got {type(calib).__name__}")
    return [check_sequence_input(f"calib[{i}]", b, d_input) for i, b in enumerate(calib)]


def calibrate(analog: S4DModel, batches: Sequence[np.ndarray]) -> None:
    """Set the converter ranges of every part of a converted model from ``batches`` (module docstring):
    two exact passes over the batches, inputs then outputs. Programs nothing (``to_analog`` does)."""
    parts = analog_parts(analog)
    if not parts:
        raise ValueError("calibrate() needs a model converted by to_analog (it has no analog part)")
    for phase in PHASES:
        for part in parts:
            part.start_calibration(phase)
        for x in batches:
            analog.forward(x, training=False)
        for part in parts:
            part.finish_calibration()
    for part in parts:  # what the exact passes used is not the arrays' work
        part.counters = AnalogCounters()


def counters(analog: S4DModel) -> AnalogCounters:
    """What every part of a converted model used so far, summed (samples: the first core's)."""
    total = AnalogCounters()
    cores = [p for p in analog_parts(analog) if isinstance(p, AnalogSSMCore)]
    for part in analog_parts(analog):
        c = part.counters
        total.add(AnalogCounters(0, c.mvms, c.adc_conversions, c.adc_clipped, c.bm_retries, 0))
    total.samples = cores[0].counters.samples if cores else 0
    return total


def _overflowed(analog: S4DModel, batch: int) -> np.ndarray:
    """(batch,) whether any layer's state overflowed in the last forward."""
    out = np.zeros(batch, dtype=bool)
    for part in analog_parts(analog):
        if isinstance(part, AnalogSSMCore):
            out |= part.last_overflow >= 0
    return out


def evaluate_analog(model: S4DModel, x: np.ndarray, y: np.ndarray, config: CrossbarConfig, *, batch_size: int = 64,
                    seed: int = 0, state_bound: float | None = None,
                    calib: np.ndarray | Sequence[np.ndarray] | None = None) -> dict[str, Any]:
    """Accuracy of ``model`` on crossbars over x (n, length, d_input), labels y (n,), next to its digital
    recurrent forward.

    Returns ``accuracy`` (a sample whose state overflowed counts as wrong), ``digital_accuracy``,
    ``agreement`` (the fraction of samples whose analog prediction equals the digital recurrent
    one), ``overflowed`` (samples), ``state_bounds`` (per layer, None for none), ``samples``,
    ``arrays`` (tiles), ``adc_conversions`` (first rounds), ``adc_clipped``, ``bm_retries``,
    ``mvms``, ``calibrated``, ``seconds`` / ``samples_per_s`` (analog inference, programming and
    calibration excluded) and ``digital_seconds``. Same seed (and calib), same result.
    """
    x, y = check_labeled("x", x, "y", y, model.d_input, model.d_output)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    check_int("seed", seed, min_value=0)
    analog = to_analog(model, config, seed, calib, state_bound=state_bound, batch_size=batch_size)
    digital, predicted, overflowed = [], [], []
    start = time.perf_counter()
    for xb in _batches(x, batch_size):
        digital.append(np.argmax(model.forward(xb, training=False, mode="recurrent"), axis=1))
    digital_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for xb in _batches(x, batch_size):
        predicted.append(np.argmax(analog.forward(xb, training=False), axis=1))
        overflowed.append(_overflowed(analog, xb.shape[0]))
    seconds = time.perf_counter() - start
    d, p, o = np.concatenate(digital), np.concatenate(predicted), np.concatenate(overflowed)
    ok = (p == y) & ~o
    c = counters(analog)
    cores = [part for part in analog_parts(analog) if isinstance(part, AnalogSSMCore)]
    n = x.shape[0]
    return {"accuracy": float(ok.mean()), "digital_accuracy": float((d == y).mean()),
            "agreement": float(((p == d) & ~o).mean()), "overflowed": int(o.sum()),
            "state_bounds": [None if not np.isfinite(core.state_bound) else core.state_bound for core in cores],
            "samples": n, "arrays": sum(part.n_tiles for part in analog_parts(analog)),
            "adc_conversions": c.adc_conversions, "adc_clipped": c.adc_clipped, "bm_retries": c.bm_retries,
            "mvms": c.mvms, "calibrated": calib is not None, "seconds": seconds,
            "samples_per_s": n / seconds if seconds > 0 else float("inf"), "digital_seconds": digital_seconds}
