"""Post-training quantization: rebuild a trained float model with a ``QuantConfig``, calibrate, sweep.

* ``with_quant(model, quant, abar=None)``: a NEW ``S4DModel`` with the same config
  except ``quant`` (and ``abar``), the float weights and norm statistics copied
  (quantizer steps and ranges are not: they belong to the new config). Changing
  ``abar`` from continuous to discrete / frozen sets Abar, Bbar from the source's
  discretization. Also the start of QAT fine-tuning from a float checkpoint.
* ``calibrate(model, batches, mode)``: evaluation forwards on a few batches during
  which every ``scale_mode="running"`` quantizer (activations, the conv-mode K / u,
  the recurrent state) folds the batch ranges into its running buffers
  (``Quantizer.observe``: the first batch sets them, later ones an EMA with the
  quantizer's momentum); afterwards the ranges are frozen: evaluation no longer
  depends on the batch. Dropout and BatchNorm stay in evaluation mode.
* ``ptq(model, quant, calib_batches, mode)``: ``with_quant`` + ``calibrate``.
* ``static_ranges(model, calib_batches, mode)``: a QAT model whose state and act
  quantizers take their range from the data (``absmax``) rebuilt with calibrated
  running ranges, the rest of its quantization kept: its evaluation then no longer
  depends on the batch, and a crossbar can put its state grid on the arrays
  (``CrossbarConfig.state_grid`` "model").
* ``ptq_sweep(model, targets, bits, calib_batches, evaluate, grid, mode)``: the
  QS4D PTQ protocol. Per target ("all" = every target at once, else only that
  target) and per b in ``bits``: levels = 2**b on ``grid`` with static
  (calibrated) activation and state ranges and per-call absmax weight ranges;
  returns rows {"target", "bits", "levels", "grid", "accuracy"}.

Grids for 2**b states (``quant.grids``): ``narrow`` (the default) uses the
symmetric codes -(2**(b-1)-1)..2**(b-1)-1, which fit a b-bit word (b = 1 is
rejected: it would leave only the code 0); ``qs4d`` reproduces the reference's
-(2**(b-1))..2**(b-1) (2**b + 1 levels, one bit more than b); ``full`` is b-bit two's
complement. In convolution mode the state target's K and u get 2**(b-1) states, as
in the reference, but at least 3 on ``narrow`` (ternary) and 2 elsewhere
(``QuantConfig.spec_for``).

PTQ builds and runs whole models, so it sits above ``models`` (it was
``qs4d_np.quant.ptq``, which keeps deprecated aliases of these names).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from qs4d_np.core.checks import check_bool, check_choice, check_int
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.config import TARGETS, QuantConfig
from qs4d_np.quant.grids import GRIDS
from qs4d_np.quant.quantizer import Quantizer
from qs4d_np.ssm.s4d import S4D

MODES = ("conv", "recurrent")
# PTQ's static ranges: activations and the state calibrated, weights by their absmax.
PTQ_TARGET_OPTIONS = {"act": {"scale_mode": "running"}, "state": {"scale_mode": "running"}}


def _is_quantizer_entry(name: str) -> bool:
    return any(part.startswith("quant_") for part in name.split("."))


def with_quant(model: S4DModel, quant: QuantConfig | None, abar: str | None = None) -> S4DModel:
    """A new model like ``model`` but with ``quant`` (None = float) and ``abar``; float weights copied."""
    if not isinstance(model, S4DModel):
        raise TypeError(f"model must be an S4DModel, got {type(model).__name__}")
    if quant is not None and not isinstance(quant, QuantConfig):
        raise TypeError(f"quant must be a QuantConfig or None, got {type(quant).__name__}")
    config = dict(model.config)
    config["quant"] = quant
    if abar is not None:
        config["abar"] = abar
    new = S4DModel(**config)
    for (_, src), (_, dst) in zip(((n, m) for n, m in model.modules() if isinstance(m, S4D)),
                                  ((n, m) for n, m in new.modules() if isinstance(m, S4D))):
        if src.abar != dst.abar:
            if dst.abar == "continuous":
                raise ValueError(f"cannot rebuild abar={src.abar!r} as abar='continuous': A and dt are not "
                                 "recoverable from a learned Abar")
            d = src.discrete()
            dst.set_discrete(d.Abar, d.Bbar)
    params, buffers = new.params, new.named_buffers()
    for name, value in model.params.items():
        if not _is_quantizer_entry(name) and name in params and params[name].shape == value.shape:
            params[name][...] = value
    for name, value in model.named_buffers().items():
        if not _is_quantizer_entry(name) and name in buffers and buffers[name].shape == value.shape:
            buffers[name][...] = value
    for _, m in new.modules():
        if isinstance(m, S4D) and m.quant is not None:
            m.init_param_steps()  # learned steps from the copied weights, not the fresh init
    return new


def calibrate(model: S4DModel, batches: Iterable[np.ndarray], mode: str = "conv") -> None:
    """Record the running ranges of ``model``'s ``scale_mode="running"`` quantizers on ``batches``.

    Each batch is an input x (batch, length, d_input); at least one is needed.
    """
    check_choice("mode", mode, MODES)
    running = [m for _, m in model.modules() if isinstance(m, Quantizer) and m.scale_mode == "running"]
    n = 0
    try:
        for q in running:
            q.calibrating = True
        for x in batches:
            model.forward(x, training=False, mode=mode)
            n += 1
    finally:
        for q in running:
            q.calibrating = False
    if n == 0:
        raise ValueError("calibrate needs at least one batch, got an empty iterable")


def ptq(model: S4DModel, quant: QuantConfig, calib_batches: Iterable[np.ndarray],
        mode: str = "conv") -> S4DModel:
    """``with_quant(model, quant)`` calibrated on ``calib_batches`` (a new model)."""
    new = with_quant(model, quant)
    calibrate(new, calib_batches, mode)
    return new


def static_ranges(model: S4DModel, calib_batches: Iterable[np.ndarray], mode: str = "recurrent") -> S4DModel:
    """A new model like ``model`` with ``scale_mode="running"`` state and act quantizers calibrated on
    ``calib_batches`` (module docstring); a float model is returned as it is."""
    quant = model.quant
    if quant is None:
        return model
    options = quant.to_dict()["target_options"]
    running = {t: dict(options.get(t, {}), scale_mode="running") for t in ("state", "act")}
    static = with_quant(model, QuantConfig.from_dict({**quant.to_dict(), "target_options": {**options, **running}}))
    calibrate(static, calib_batches, mode=mode)
    return static


def sweep_config(target: str, bits: int, grid: str = "narrow", per_channel: bool = False) -> QuantConfig:
    """The PTQ config of one sweep point: 2**bits states for ``target`` ("all" = every target),
    one scale per tensor or, with ``per_channel``, per channel."""
    levels = 2 ** bits
    kwargs = {"all": levels} if target == "all" else {target: levels}
    return QuantConfig(**kwargs, grid=grid, per_channel=per_channel, target_options=PTQ_TARGET_OPTIONS)


def ptq_sweep(model: S4DModel, targets: Sequence[str], bits: Sequence[int],
              calib_batches: Iterable[np.ndarray], evaluate: Callable[[S4DModel], float], *,
              grid: str = "narrow", mode: str = "conv", per_channel: bool = False) -> list[dict]:
    """Accuracy of the PTQ model per (target, bits), rows in the order targets x bits.

    ``evaluate(model) -> accuracy`` runs the caller's test set; ``calib_batches`` are
    reused for every point (a one-shot iterator is materialised once). ``per_channel``: one
    scale per channel (H, or the weight's output columns) instead of per tensor.
    """
    check_choice("grid", grid, GRIDS)
    check_bool("per_channel", per_channel)
    check_choice("mode", mode, MODES)
    targets = list(targets)
    bits = [check_int(f"bits[{i}]", b, min_value=1, max_value=52) for i, b in enumerate(bits)]
    if not targets or not bits:
        raise ValueError(f"ptq_sweep needs at least one target and one bit width, got targets={targets}, bits={bits}")
    for t in targets:
        check_choice("target", t, ("all",) + TARGETS)
    batches = list(calib_batches)
    if not batches:
        raise ValueError("ptq_sweep needs at least one calibration batch")
    configs = {}
    for t in targets:  # every point's grid is checked before the first (slow) evaluation
        for b in bits:
            cfg = sweep_config(t, b, grid, per_channel)
            for target in TARGETS:
                try:
                    cfg.spec_for(target)
                except ValueError as err:
                    raise ValueError(f"ptq_sweep point target={t!r}, bits={b} (levels {2 ** b}, grid {grid!r}) "
                                     f"is not valid: {err}") from None
            configs[t, b] = cfg
    rows = []
    for t in targets:
        for b in bits:
            accuracy = float(evaluate(ptq(model, configs[t, b], batches, mode)))
            rows.append({"target": t, "bits": b, "levels": 2 ** b, "grid": grid, "accuracy": accuracy})
    return rows
