"""A model's datapath as ``MatVecOp``s, its bit widths, and the full metrics table.

The ops describe one time step of the IMSSA mapping (``qs4d_np.hardware.imssa_layout``),
counting only cells that hold a structurally non-zero weight, per layer i:

| op | shape (in x out) | copies | weight / input / ADC bits |
|---|---|---|---|
| ``encoder`` | d_in x H | 1 | coder / act / act |
| ``layers.i.Abar`` | 2 x 2 (one [[Re, -Im], [Im, Re]] block) | mapped modes | A / state / state |
| ``layers.i.Bbar`` | 1 x 2 (u into one mode's Re, Im) | mapped modes | B (A when B = 0) / act / none |
| ``layers.i.C[h]`` | 2m_h x 1 (the output row of channel h) | 1 per channel with modes | C / state / act |
| ``layers.i.D`` | 1 x 1 | channels with D != 0 | D / act / act only where the channel has no mode |
| ``layers.i.mixing`` | H x 2H | 1 | lin / act / act |
| ``decoder`` | H x d_out | 1 | coder / act / act |

Pruned parts drop out by the rule of ``qs4d_np.hardware.pruning_masks``: modes with
C = 0, channels with no mode and D = 0, and all-zero rows / columns of the
Linear weights (``active_rows`` / ``active_cols``). Bbar has no bit width of
its own in S4D (B = 1 is folded into C, r_B = 0 in the QS4D formulas), so it
is stored at A's width unless ``BitWidths.B`` is set.

Differences to the QS4D formulas (both are reported): the mapping stores the
2x2 Abar block in 4 cells and does 4 MACs per mode (the formulas count N*r_A
per channel: 2 per mode and no Bbar); the mixing Linear converts its 2H
outputs at the activation width (the ADC formula counts H*r_lin). The figures
are per time step, like the formulas (the decoder counted once).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from qs4d_np.hardware.imssa_layout import active_modes
from qs4d_np.hardware.metrics import (FLOAT_BITS, BitWidths, MatVecOp, SSMShape, count_datapath,
                                      summary)
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.config import QuantConfig

# BitWidths field -> QuantConfig target
QUANT_TARGETS = {"A": "A", "C": "C", "dt": "dt", "state": "state", "act": "act", "lin": "linear",
                 "coder": "coder", "D": "D"}


def model_shape(model: S4DModel) -> SSMShape:
    """The formulas' SSMShape of an S4DModel (N = d_state, counted as reals)."""
    cfg = model.config
    return SSMShape(N=int(cfg["d_state"]), H=int(cfg["d_model"]), layers=int(cfg["n_layers"]),
                    d_in=int(model.d_input), d_out=int(model.d_output))


def bit_widths(quant: QuantConfig | None, layer: int | None = None, *, learn_B: bool = False) -> BitWidths:
    """BitWidths of a QuantConfig (``bits_for`` per target; float targets get 32), or float32 for None.

    B gets bits only for a model that learns B (``learn_B``); S4D's fixed B has r_B = 0.
    """
    if quant is None:
        return BitWidths.float32()
    values = {}
    for field, target in QUANT_TARGETS.items():
        bits = quant.bits_for(target, layer)
        values[field] = FLOAT_BITS if bits is None else int(bits)
    b = quant.bits_for("B", layer) if learn_B else None
    return BitWidths(**values, B=0 if b is None else int(b))


def _active(weight: np.ndarray, dense: bool) -> tuple[int, int]:
    """Rows (inputs) and columns (outputs) of a (d_in, d_out) weight that hold a non-zero entry."""
    if dense:
        return weight.shape
    nz = weight != 0
    return int(nz.any(axis=1).sum()), int(nz.any(axis=0).sum())


def _linear_op(name: str, weight: np.ndarray, r: BitWidths, weight_bits: int, dense: bool) -> MatVecOp:
    rows, cols = _active(weight, dense)
    return MatVecOp(name, rows=weight.shape[0], cols=weight.shape[1], weight_bits=weight_bits, input_bits=r.act,
                    output_bits=r.act, active_rows=rows, active_cols=cols)


def model_datapath(model: S4DModel, bits: BitWidths | Sequence[BitWidths], *, dense: bool = False) -> list[MatVecOp]:
    """The ops of one time step (module docstring); ``bits``: one BitWidths or one per layer.

    ``dense=True`` ignores pruning (every mode, channel, row and column counted): the unpruned model.
    """
    n_layers = len(model.blocks)
    per_layer = list(bits) if isinstance(bits, (list, tuple)) else [bits] * n_layers
    if len(per_layer) != n_layers or not all(isinstance(b, BitWidths) for b in per_layer):
        raise ValueError(f"bits must be a BitWidths or a list of {n_layers} (one per layer), got {bits!r}")
    first, last = per_layer[0], per_layer[-1]
    ops = [_linear_op("encoder", model.encoder.weight, first, first.coder, dense)]
    for i, (block, r) in enumerate(zip(model.blocks, per_layer)):
        ssm = block.ssm
        eff = ssm.effective_ssm("recurrent")  # a QAT C quantized to 0 maps no mode (the golden export drops it too)
        C, D = eff.C, eff.D
        if dense:
            C, D = np.ones_like(C), np.ones_like(D)
        modes = [len(m) for m in active_modes(C)]
        n_modes = sum(modes)
        if n_modes:
            ops.append(MatVecOp(f"layers.{i}.Abar", rows=2, cols=2, copies=n_modes, weight_bits=r.A,
                                input_bits=r.state, output_bits=r.state))
            ops.append(MatVecOp(f"layers.{i}.Bbar", rows=1, cols=2, copies=n_modes, weight_bits=r.B or r.A,
                                input_bits=r.act, output_bits=0))
        ops += [MatVecOp(f"layers.{i}.C[{h}]", rows=2 * m, cols=1, weight_bits=r.C, input_bits=r.state,
                         output_bits=r.act) for h, m in enumerate(modes) if m]
        with_modes = int(np.count_nonzero((D != 0) & (np.array(modes) > 0)))
        alone = int(np.count_nonzero((D != 0) & (np.array(modes) == 0)))
        if with_modes:
            ops.append(MatVecOp(f"layers.{i}.D", rows=1, cols=1, copies=with_modes, weight_bits=r.D,
                                input_bits=r.act, output_bits=0))
        if alone:
            ops.append(MatVecOp(f"layers.{i}.D(alone)", rows=1, cols=1, copies=alone, weight_bits=r.D,
                                input_bits=r.act, output_bits=r.act))
        if ssm.mixing is not None:
            ops.append(_linear_op(f"layers.{i}.mixing", ssm.mixing.linear.weight, r, r.lin, dense))
    ops.append(_linear_op("decoder", model.decoder.weight, last, last.coder, dense))
    return ops


def metrics_table(model: S4DModel, bits: BitWidths | Sequence[BitWidths], *, compat: str = "corrected",
                  baseline: BitWidths | None = None) -> dict[str, Any]:
    """Formula figures (QS4D, ``compat``) and datapath counts of ``model``, each with the float32 baseline
    and the reduction. The datapath baseline is the unpruned (dense) model at ``baseline`` widths, so
    pruning shows in the reductions. Per-layer bits enter the formulas as layer 0's widths (the formulas
    know one width per target); the datapath uses each layer's own."""
    layer_bits = list(bits) if isinstance(bits, (list, tuple)) else [bits]
    base = baseline if baseline is not None else BitWidths.float32()
    formulas = summary(model_shape(model), layer_bits[0], base, compat)
    counted = count_datapath(model_datapath(model, bits))
    float_counted = count_datapath(model_datapath(model, base, dense=True))
    datapath: dict[str, Any] = {}
    for name in ("bit_ops", "bits_stored", "adc_conversions", "adc_bits"):
        b, q = getattr(float_counted, name), getattr(counted, name)
        datapath[name] = {"baseline": b, "quantized": q, "reduction": b / q if q else float("inf")}
    datapath["macs"] = {"total": sum(counted.macs.values()),
                        "by_widths": {f"{w}x{i}": n for (w, i), n in sorted(counted.macs.items())}}
    return {"compat": compat, "formulas": formulas, "datapath": datapath}
