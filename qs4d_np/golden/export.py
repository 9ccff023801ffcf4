"""Build the integer model from a trained S4DModel (export time: floats in, integers out).

``from_model(model, x_calib, quant=QuantConfig(...))`` quantizes every
weight with the QAT quantizers' rule (symmetric absmax, round half to even,
on the config's grids), calibrates the fixed steps (state: ``state_absmax``
and ``StateQuant.calibrated``; act: the act quantizer's range rule; the
integer-only points u, y, za, zb, out, logits: absmax over the calibration
batch times ``headroom`` onto ``widths``), folds BatchNorm (eval) and the
decoder's 1/L, and turns every step ratio into integer multipliers and
shifts (``multiplier.py``). It also records, per rounded tensor, the local
agreement bound eps of docs/integer_spec.md section 6.

Supported: the QS4D block (no activation, GLU mixing, BatchNorm postnorm or
none, residual or not), mean pooling. Anything else (LayerNorm, GELU, prenorm,
last pooling, float targets) is refused with the reason.

Each block is ``qs4d_np.golden.export_layer``; the codes, calibrated steps and requantizers both
build on are ``qs4d_np.golden.export_quant``.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from qs4d_np.core.checks import check_array, check_bool, check_float, check_int
from qs4d_np.core.linear import Linear
from qs4d_np.golden.export_layer import export_layer
from qs4d_np.golden.export_quant import ExportQuantizer, calib_step, int_linear, one_term
from qs4d_np.golden.fixedpoint import IntFormat
from qs4d_np.golden.model import IntegerModel, IntLinear, Requant
from qs4d_np.golden.multiplier import ShiftRule
from qs4d_np.golden.twin import codes
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.config import QuantConfig

# Targets the integer model needs quantized (float ones cannot be made integer).
REQUIRED_TARGETS = ("A", "B", "C", "D", "state", "linear", "act", "coder")
# Widths of the points only the integer model rounds (the QAT model keeps them float).
DEFAULT_WIDTHS = {"in": 9, "u": 16, "y": 16, "za": 16, "zb": 12, "avg": 16, "logits": 16}
# Fraction bits of the sigmoid table: its rounding adds |za| * 2**-(F+1) to the act bound.
SIG_BITS = 20


def _check_supported(model: S4DModel) -> None:
    cfg = model.config
    problems = []
    if cfg.get("norm") not in (None, "batch"):
        problems.append(f"norm={cfg.get('norm')!r} (LayerNorm needs a per-step integer mean and inverse "
                        f"square root, not in the integer spec; use norm='batch' or None)")
    if cfg.get("prenorm") and cfg.get("norm") is not None:
        problems.append("prenorm=True (only the postnorm BatchNorm folds into the block output)")
    if cfg.get("activation", "gelu") is not None:
        problems.append(f"activation={cfg.get('activation', 'gelu')!r} (the integer spec's block has none, "
                        f"as the QS4D preset)")
    if cfg.get("mixing", "glu") != "glu":
        problems.append(f"mixing={cfg.get('mixing')!r} (the integer spec's block mixes with Linear + GLU)")
    if cfg.get("pool") != "mean":
        problems.append(f"pool={cfg.get('pool')!r} (the integer decoder pools by the mean)")
    if problems:
        raise ValueError("this model cannot be made integer: " + "; ".join(problems))


def _check_targets(quant: QuantConfig, n_layers: int) -> None:
    missing = []
    for t in REQUIRED_TARGETS:
        float_layers = [i for i in range(n_layers) if quant.levels_for(t, i) is None]
        if float_layers:
            missing.append(t if len(float_layers) == n_layers else f"{t} (layers {float_layers})")
    if missing:
        raise ValueError(f"float (unquantized) targets cannot be made integer: {', '.join(missing)}; "
                         f"give them levels in the QuantConfig")


def _check_fixed_ranges(quant: QuantConfig) -> None:
    """A QAT model whose state or act range is per batch (absmax) has no step the integer model can fix."""
    batch = {t: quant.target(t).scale_mode for t in ("state", "act")
             if quant.target(t).scale_mode in ("absmax", "absmean")}
    if batch:
        raise ValueError(
            f"this QAT model takes the range of {' and '.join(batch)} from each batch "
            f"({', '.join(f'{t}: {m}' for t, m in batch.items())}); the integer model needs fixed steps: train or "
            f"fine-tune it with running ranges (qs4d train --init-from RUN --scale_mode state=running act=running "
            f"...; Python: QuantConfig(..., target_options={{'state': {{'scale_mode': 'running'}}, "
            f"'act': {{'scale_mode': 'running'}}}})), or export it as a float model with --*_quant flags (PTQ)")


def _coder(name: str, linear: Linear, qz: ExportQuantizer, a: np.ndarray, in_fmt: IntFormat, s_a: float,
           out_fmt: IntFormat, headroom: float, rule: ShiftRule, model_q=None) -> tuple[IntLinear, float, float, np.ndarray]:
    """Encoder or decoder (``coder`` weights): the IntLinear, its eps, the calibrated output step, s_W."""
    wq = getattr(model_q, "quantizer", None)
    Wq, sW, w_fmt = qz.weight("coder", 0, linear.weight, axis=1, model_q=wq)
    real = (a * s_a) @ (Wq * sW) + linear.bias
    s_out = calib_step(np.abs(real).max(), out_fmt, headroom)
    lin, eps = int_linear(name, Wq, linear.bias, sW, w_fmt, in_fmt, s_a, s_out, out_fmt, rule)
    return lin, eps, s_out, sW[0]



def from_model(model: S4DModel, x_calib: np.ndarray, *, quant: QuantConfig | None = None, in_step: float = 1 / 255,
               widths: Mapping[str, int] | None = None, headroom: float = 1.25,
               sig_bits: int = SIG_BITS, drop_pruned: bool = True, max_mult_bits: int | None = None,
               shift_per_tensor: bool = False, shared_state_step: bool = False) -> IntegerModel:
    """The integer model of ``model`` (an S4DModel), calibrated on float inputs ``x_calib`` (B, L, d_in).

    ``quant`` defaults to the model's own ``quant`` config; ``in_step`` is the
    input step (pixels / 255: 1/255, so pixel p is the code p); ``widths``
    overrides DEFAULT_WIDTHS and any target's width (a width narrower than
    the target's grid is an error naming both). The decoder's 1/L is folded
    for L = x_calib.shape[1]. With ``drop_pruned`` (default) the modes whose
    quantized C is 0 (pruned: ``qs4d_np.hardware.pruning``) are dropped from
    each core (``export_layer._drop_zero_c_modes``); every output but the
    per-mode state tensors is the same integer as without.

    Width control (docs/integer_spec.md, section 2.4): ``max_mult_bits`` B keeps every multiplier
    below 2**B (refused, naming the smallest B that works, where the error bound would break);
    ``shift_per_tensor`` gives every channel of a tensor one shift; ``shared_state_step`` gives
    Abar's real and imaginary parts one step (the larger) and the state's parts one step (the
    coarser), so the three Abar multipliers are equal and the 3-multiplier product is exact.
    """
    _check_supported(model)
    if quant is None:
        quant = getattr(model, "quant", None)
        if quant is None:
            raise ValueError("the model has no quantization config (a float model): pass quant= "
                             "(CLI: the --*_quant flags)")
    if not isinstance(quant, QuantConfig):
        raise TypeError(f"quant must be a QuantConfig, got {type(quant).__name__}")
    n_layers = len(model.blocks)
    _check_targets(quant, n_layers)
    x_calib = check_array("x_calib", x_calib, ndim=3, min_size=1)
    if x_calib.shape[2] != model.d_input:
        raise ValueError(f"x_calib must have shape (batch, length, {model.d_input}), got {x_calib.shape}")
    in_step = check_float("in_step", in_step, min_value=0.0, min_inclusive=False)
    headroom = check_float("headroom", headroom, min_value=1.0)
    sig_bits = check_int("sig_bits", sig_bits, min_value=1, max_value=30)
    drop_pruned = check_bool("drop_pruned", drop_pruned)
    rule = ShiftRule(max_mult_bits, check_bool("shift_per_tensor", shift_per_tensor))
    shared_state_step = check_bool("shared_state_step", shared_state_step)
    W = {**DEFAULT_WIDTHS, **(widths or {})}
    for k, v in W.items():
        check_int(f"widths[{k!r}]", v, min_value=2, max_value=32)
    qz = ExportQuantizer(quant, W, own=quant is getattr(model, "quant", None))
    if qz.own:
        _check_fixed_ranges(quant)
    L = x_calib.shape[1]
    H = model.blocks[0].ssm.d_model
    steps: dict[str, np.ndarray] = {"in": np.float64(in_step)}
    eps: dict[str, float] = {}
    full = IntFormat.full

    in_fmt = full(W["in"])
    x_int = codes(x_calib.astype(np.float64) / in_step, in_fmt)
    u_fmt = full(W["u"])
    encoder, eps["layers.0.u"], s_u, steps["encoder.W"] = _coder(
        "encoder", model.encoder, qz, x_int, in_fmt, in_step, u_fmt, headroom, rule,
        getattr(model, "coder_quant", {}).get("encoder"))
    u, _ = encoder(x_int)

    layers = []
    for i, block in enumerate(model.blocks):
        p = f"layers.{i}."
        layer, u, u_fmt, s_u = export_layer(i, block, qz, u, u_fmt, s_u, W, headroom, sig_bits, steps, eps, p,
                                            drop_pruned, rule, shared_state_step)
        layers.append(layer)
    steps["out_last"] = np.float64(s_u)

    pooled = u.sum(axis=1)
    avg_fmt = full(W["avg"])
    s_avg = calib_step(np.abs(pooled).max() * s_u / L, avg_fmt, headroom)
    M, R, e = one_term(np.full(H, s_u / (L * s_avg)), np.full(H, L * u_fmt.maxabs), "pool", rule)
    pool = Requant("pool", [M], R, avg_fmt, [L * u_fmt.maxabs])
    eps["avg"] = float(e.max())
    avg, _ = pool([pooled])
    decoder, eps["logits"], s_logit, steps["decoder.W"] = _coder(
        "decoder", model.decoder, qz, avg, avg_fmt, s_avg, full(W["logits"]), headroom, rule,
        getattr(model, "coder_quant", {}).get("decoder"))
    steps.update({"avg": np.float64(s_avg), "logits": np.float64(s_logit)})
    rule.check()
    return IntegerModel(in_fmt, encoder, layers, pool, decoder, L, steps, eps)


