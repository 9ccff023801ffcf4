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
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from qs4d_np.core.checks import check_array, check_bool, check_float, check_int
from qs4d_np.core.linear import Linear
from qs4d_np.golden.fixedpoint import IntFormat
from qs4d_np.golden.layer import SSMCore, SSMCoreFormats
from qs4d_np.golden.model import IntegerModel, IntLayer, IntLinear, ModeMap, Requant
from qs4d_np.golden.multiplier import ShiftRule, ssm_core_multipliers
from qs4d_np.golden.twin import codes, sigmoid
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.config import QuantConfig
from qs4d_np.quant.fake import quantize
from qs4d_np.quant.scan import StateQuant, quant_scan, state_absmax

# Targets the integer model needs quantized (float ones cannot be made integer).
REQUIRED_TARGETS = ("A", "B", "C", "D", "state", "linear", "act", "coder")
# Widths of the points only the integer model rounds (the QAT model keeps them float).
DEFAULT_WIDTHS = {"in": 9, "u": 16, "y": 16, "za": 16, "zb": 12, "avg": 16, "logits": 16}
# Fraction bits of the sigmoid table: its rounding adds |za| * 2**-(F+1) to the act bound.
SIG_BITS = 20
# Steps with one value per mode (H, N2): compacted with the core when modes are dropped.
MODE_STEPS = ("Abar_re", "Abar_im", "Bbar_re", "Bbar_im")
# The gate grid never spans more than +-GATE_RANGE: sigmoid(16) rounds to 2**15 / 2**15 already.
GATE_RANGE = 16.0


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


class _Quantizer:
    """Codes, steps and IntFormat (explicit width or the grid's) of each quantized target.

    With ``own`` (the model's own QAT config) the model's quantizers give the
    codes and steps, exactly as its evaluation forward quantizes (learned,
    running or absmax ranges); otherwise the config's rule (absmax) is applied
    to the float weights (post-training quantization).
    """

    def __init__(self, quant: QuantConfig, widths: Mapping[str, int], own: bool) -> None:
        self.quant, self.widths, self.own = quant, widths, own

    def fmt(self, target: str, layer: int) -> IntFormat:
        spec = self.quant.spec_for(target, layer)
        if not spec.symmetric or spec.rounding != "half_even":
            raise ValueError(f"target {target!r} is quantized with symmetric={spec.symmetric}, "
                             f"rounding={spec.rounding!r}; the integer spec needs symmetric half_even")
        g = spec.code_grid
        return IntFormat(self.widths.get(target, g.bits), g.qmin, g.qmax)

    def weight(self, target: str, layer: int, w: np.ndarray, axis: int, model_q=None
               ) -> tuple[np.ndarray, np.ndarray, IntFormat]:
        """(codes, steps broadcast to the codes' shape, format); complex -> leading (re, im) axis.

        ``model_q`` is the model's own quantizer of this tensor (used when ``own``).
        """
        fmt = self.fmt(target, layer)
        if self.own and model_q is not None:
            qt = model_q.quantize(w)
        else:
            spec = self.quant.spec_for(target, layer, axis)
            w = np.asarray(w, dtype=np.complex128 if np.iscomplexobj(w) else np.float64)
            # Abar's codes stay in the unit disk as in a QAT layer (QuantConfig's abar_bound)
            bound = 1.0 if target == "A" and self.quant.target("A").abar_bound else None
            qt = quantize(w, spec.levels, grid=spec.grid, symmetric=True, axis=spec.axis, rounding="half_even",
                          power_of_two=spec.power_of_two, complex_mode="cartesian", max_modulus=bound)
        if np.any(qt.zero_point != 0):
            raise ValueError(f"target {target!r} has a nonzero zero point; the integer spec is symmetric")
        steps = 1.0 / np.asarray(qt.inv_scale, dtype=np.float64)
        return qt.q.astype(np.int64), np.broadcast_to(steps, qt.q.shape).astype(np.float64), fmt

    def act_steps(self, layer: int, act_real: np.ndarray, model_q=None) -> np.ndarray:
        """The act step per channel (H,): the model's act quantizer on ``act_real`` (B, L, H), or absmax."""
        H = act_real.shape[-1]
        if self.own and model_q is not None:
            inv = np.asarray(model_q.quantize(act_real.astype(model_q.dtype)).inv_scale, dtype=np.float64)
        else:
            spec = self.quant.spec_for("act", layer)
            r = np.array([np.abs(act_real).max()])
            inv, _ = spec.scales(-r, r, np.dtype(np.float64))
        return np.broadcast_to(1.0 / inv.reshape(-1), (H,)).astype(np.float64)

    def state_inv(self, layer: int, ssm, u_real: np.ndarray, Abar: np.ndarray, Bbar: np.ndarray) -> np.ndarray:
        """The state's codes per unit (H, 2): the model's state quantizer, or calibrated per part."""
        H = ssm.d_model
        clip = np.inf if getattr(ssm, "state_clip", None) is None else ssm.state_clip
        if self.own and ssm.q.get("x") is not None:
            state = ssm.q["x"].scan_scales(u_real.astype(ssm.dtype), Abar, Bbar, clip)
        else:
            absmax = state_absmax(u_real, Abar, Bbar, StateQuant(None), clip)
            state = StateQuant.calibrated(self.quant.spec_for("state", layer), absmax, "part")
        return state.per_channel_inv(H, np.dtype(np.float64))


def _calib_step(absmax: float, fmt: IntFormat, headroom: float) -> float:
    return max(float(absmax), 1e-12) * headroom / fmt.qmax


def _one_term(ratios: np.ndarray, bounds: np.ndarray, name: str, rule: ShiftRule
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel (M, R, eps) of a one-term requantization, the shift chosen by ``rule``
    (default: the int64 headroom).

    (A 31-bit TFLite multiplier would overflow int64 on wide accumulators, e.g.
    the decoder's sum over 784 steps; eps = bound * |r - M/2**R| in output LSBs.)
    """
    mults, shifts = rule.choose(name, [[float(r)] for r in ratios], [[int(b)] for b in bounds])
    M = np.array([m[0] for m in mults], dtype=np.int64)
    R = np.array(shifts, dtype=np.int64)
    return M, R, np.asarray(bounds, dtype=np.float64) * np.abs(ratios - M / 2.0 ** R)


def _linear(name: str, W: np.ndarray, b: np.ndarray, s_W: np.ndarray, w_fmt: IntFormat, in_fmt: IntFormat,
            s_in: float, s_out: float, out_fmt: IntFormat, rule: ShiftRule, site: str | None = None
            ) -> tuple[IntLinear, float]:
    """An IntLinear with the bias at the product scale; also its local eps (output LSBs)."""
    s_W = np.broadcast_to(s_W, W.shape)[0]  # per output column
    b_int = np.array([round(v) for v in np.asarray(b, dtype=np.float64) / (s_W * s_in)], dtype=np.int64)
    # the bound IntLinear proves headroom with (one for all outputs)
    acc = np.full(W.shape[1], W.shape[0] * w_fmt.maxabs * in_fmt.maxabs + int(np.abs(b_int).max()), dtype=object)
    M, R, eps = _one_term(s_W * s_in / s_out, acc, site or name, rule)
    return IntLinear(name, W, b_int, w_fmt, in_fmt, M, R, out_fmt), float(np.max(eps))


def _clipped_grid(fmt: IntFormat, clip: float | None, inv: np.ndarray, layer: int) -> IntFormat:
    """The state grid narrowed by the scan's clip |w| <= clip (docs/integer_spec.md, section 6)."""
    if clip is None:
        return fmt
    lo = np.maximum(fmt.qmin, np.rint(-clip * inv)).astype(np.int64)
    hi = np.minimum(fmt.qmax, np.rint(clip * inv)).astype(np.int64)
    if lo.min() != lo.max() or hi.min() != hi.max():
        raise ValueError(f"layer {layer}: state_clip {clip} maps to different grids per channel or part "
                         f"([{lo.min()}, {hi.min()}] .. [{lo.max()}, {hi.max()}]); the integer state has one grid")
    return IntFormat(fmt.width, int(lo.flat[0]), int(hi.flat[0]))


def _coder(name: str, linear: Linear, qz: _Quantizer, a: np.ndarray, in_fmt: IntFormat, s_a: float,
           out_fmt: IntFormat, headroom: float, rule: ShiftRule, model_q=None) -> tuple[IntLinear, float, float, np.ndarray]:
    """Encoder or decoder (``coder`` weights): the IntLinear, its eps, the calibrated output step, s_W."""
    wq = getattr(model_q, "quantizer", None)
    Wq, sW, w_fmt = qz.weight("coder", 0, linear.weight, axis=1, model_q=wq)
    real = (a * s_a) @ (Wq * sW) + linear.bias
    s_out = _calib_step(np.abs(real).max(), out_fmt, headroom)
    lin, eps = _linear(name, Wq, linear.bias, sW, w_fmt, in_fmt, s_a, s_out, out_fmt, rule)
    return lin, eps, s_out, sW[0]


def _core_y(core: SSMCore, u: np.ndarray) -> np.ndarray:
    """The core's y codes over u (B, L, H) without keeping the states."""
    B, L, H = u.shape
    x_re = np.zeros((B, H, core.N2), dtype=np.int64)
    x_im = np.zeros_like(x_re)
    y = np.zeros_like(u)
    for t in range(L):
        x_re, x_im, y[:, t], *_ = core.step(x_re, x_im, u[:, t])
    return y


def _multi_eps(ratios: list, mults: list, shift, bounds: list) -> np.ndarray:
    return sum(b * np.abs(r - m / 2.0 ** shift) for r, m, b in zip(ratios, mults, bounds))


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
    each core (``_drop_zero_c_modes``); every output but the per-mode state
    tensors is the same integer as without.

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
    qz = _Quantizer(quant, W, own=quant is getattr(model, "quant", None))
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
        layer, u, u_fmt, s_u = _export_layer(i, block, qz, u, u_fmt, s_u, W, headroom, sig_bits, steps, eps, p,
                                             drop_pruned, rule, shared_state_step)
        layers.append(layer)
    steps["out_last"] = np.float64(s_u)

    pooled = u.sum(axis=1)
    avg_fmt = full(W["avg"])
    s_avg = _calib_step(np.abs(pooled).max() * s_u / L, avg_fmt, headroom)
    M, R, e = _one_term(np.full(H, s_u / (L * s_avg)), np.full(H, L * u_fmt.maxabs), "pool", rule)
    pool = Requant("pool", [M], R, avg_fmt, [L * u_fmt.maxabs])
    eps["avg"] = float(e.max())
    avg, _ = pool([pooled])
    decoder, eps["logits"], s_logit, steps["decoder.W"] = _coder(
        "decoder", model.decoder, qz, avg, avg_fmt, s_avg, full(W["logits"]), headroom, rule,
        getattr(model, "coder_quant", {}).get("decoder"))
    steps.update({"avg": np.float64(s_avg), "logits": np.float64(s_logit)})
    rule.check()
    return IntegerModel(in_fmt, encoder, layers, pool, decoder, L, steps, eps)


def _drop_zero_c_modes(core: SSMCore, mode_steps: dict[str, np.ndarray]
                       ) -> tuple[SSMCore, ModeMap | None, dict[str, np.ndarray]]:
    """Drop the modes whose C codes are 0 in both parts (docs/integer_spec.md, section 5.3).

    Per channel the kept modes move to the front in their order; every channel is
    padded to N2' = the largest kept count (at least 1) with inert modes: all (H, N2)
    words 0 (Abar, Bbar, C, state multipliers, r_x), so the padding state stays 0,
    and the per-mode steps ``mode_steps`` ((H, N2) each) 0. The output multipliers
    (m_c_*, m_d, r_y) are kept as computed for the full core, so y is the same
    integer. Returns the core unchanged and None when no mode is dropped.
    """
    keep = (core.C_re != 0) | (core.C_im != 0)
    if keep.all():
        return core, None, mode_steps
    kept = tuple(tuple(int(n) for n in np.flatnonzero(row)) for row in keep)
    n2 = max(1, max(len(k) for k in kept))
    arrays = core.arrays()

    def compact(a: np.ndarray) -> np.ndarray:
        out = np.zeros((core.H, n2), dtype=a.dtype)
        for h, idx in enumerate(kept):
            out[h, :len(idx)] = a[h, list(idx)]
        return out

    arrays.update({k: compact(v) for k, v in arrays.items() if v.ndim == 2})
    new = SSMCore(core.formats, **arrays)
    return new, ModeMap(core.N2, kept), {k: compact(v) for k, v in mode_steps.items()}


def _export_layer(i, block, qz: _Quantizer, u: np.ndarray, u_fmt: IntFormat, s_u: float, W: dict,
                  headroom: float, sig_bits: int, steps: dict, eps: dict, p: str, drop_pruned: bool,
                  rule: ShiftRule, shared_state_step: bool):
    ssm = block.ssm
    H, N2 = ssm.d_model, ssm.d_state // 2
    mq = ssm.q
    # the float Abar, Bbar the recurrent forward quantizes (after a quantized dt, if any), complex128
    # as the forward quantizes them (the float32 Bbar parameter would give a different step)
    eff = ssm.effective_ssm("recurrent")
    params = ssm.params
    qA, sA, A_fmt = qz.weight("A", i, eff.Abar_float, axis=0, model_q=mq.get("Abar"))
    qB, sB, B_fmt = qz.weight("B", i, eff.Bbar_float, axis=0, model_q=mq.get("B"))
    qC, sC, C_fmt = qz.weight("C", i, params["C"], axis=0, model_q=mq.get("C"))
    qD, sD, D_fmt = qz.weight("D", i, params["D"], axis=0, model_q=mq.get("D"))
    if shared_state_step:  # one Abar step for both parts (the larger), codes rounded once from the float Abar
        s = np.maximum(sA[0], sA[1])
        Af = np.asarray(eff.Abar_float, dtype=np.complex128)
        qA = np.stack([np.clip(np.rint(part / s), A_fmt.qmin, A_fmt.qmax) for part in (Af.real, Af.imag)]
                      ).astype(np.int64)
        sA = np.stack([s, s])
    Abar_hat = sA[0] * qA[0] + 1j * sA[1] * qA[1]
    Bbar_hat = sB[0] * qB[0] + 1j * sB[1] * qB[1]
    C_hat = sC[0] * qC[0] + 1j * sC[1] * qC[1]
    D_hat = sD * qD
    if np.ptp(sC[0], axis=1).max() > 0 or np.ptp(sC[1], axis=1).max() > 0:
        raise ValueError(f"layer {i}: C steps must be per channel (H,), not per mode")

    # state step from the float states of the quantized weights, as the QAT calibration does
    u_real = u * s_u
    inv = qz.state_inv(i, ssm, u_real, Abar_hat, Bbar_hat)
    if shared_state_step:  # one state step for both parts (the coarser): then m_a_re = m_a_im_to_re = m_a_im_to_im
        inv = np.repeat(inv.min(axis=1, keepdims=True), 2, axis=1)
    state_spec = qz.quant.spec_for("state", i)
    x_fmt = _clipped_grid(qz.fmt("state", i), getattr(ssm, "state_clip", None), inv, i)
    y_fmt = IntFormat.full(W["y"])
    clip = np.inf if getattr(ssm, "state_clip", None) is None else ssm.state_clip
    y_real, _ = quant_scan(u_real, Abar_hat, Bbar_hat, C_hat, D_hat, StateQuant(state_spec, inv), clip)
    s_y = _calib_step(np.abs(y_real).max(), y_fmt, headroom)
    formats = SSMCoreFormats(u=u_fmt, Abar=A_fmt, Bbar=B_fmt, C=C_fmt, D=D_fmt, x=x_fmt, y=y_fmt)
    core_steps = dict(s_u=np.full(H, s_u), s_Abar_re=sA[0], s_Abar_im=sA[1], s_Bbar_re=sB[0], s_Bbar_im=sB[1],
                      s_C_re=sC[0][:, 0], s_C_im=sC[1][:, 0], s_D=sD, s_x_re=1.0 / inv[:, 0],
                      s_x_im=1.0 / inv[:, 1], s_y=np.full(H, s_y))
    mults = ssm_core_multipliers(formats, H=H, N2=N2, **core_steps, rule=rule, site=p[:-1])
    core = SSMCore(formats, Abar_re=qA[0], Abar_im=qA[1], Bbar_re=qB[0], Bbar_im=qB[1], C_re=qC[0],
                   C_im=qC[1], D=qD, **mults)
    cs = {k[2:]: np.asarray(v, dtype=np.float64) for k, v in core_steps.items()}
    steps.update({p + k: v for k, v in cs.items()})
    ax, bu = A_fmt.maxabs * x_fmt.maxabs, B_fmt.maxabs * u_fmt.maxabs
    for part, cross, other in (("re", "m_a_im_to_re", "im"), ("im", "m_a_im_to_im", "re")):
        r = [cs["Abar_re"], cs["Abar_im"] * cs["x_" + other][:, None] / cs["x_" + part][:, None],
             cs["Bbar_" + part] * cs["u"][:, None] / cs["x_" + part][:, None]]
        m = [mults["m_a_re"], mults[cross], mults["m_b_" + part]]
        eps[p + "x_" + part] = float(np.max(_multi_eps(r, m, mults["r_x"], [ax, ax, bu])))
    cx = N2 * C_fmt.maxabs * x_fmt.maxabs
    r = [2 * cs["C_re"] * cs["x_re"] / cs["y"], 2 * cs["C_im"] * cs["x_im"] / cs["y"], cs["D"] * cs["u"] / cs["y"]]
    eps[p + "y"] = float(np.max(_multi_eps(r, [mults["m_c_re"], mults["m_c_im"], mults["m_d"]], mults["r_y"],
                                           [cx, cx, D_fmt.maxabs * u_fmt.maxabs])))
    y = _core_y(core, u)

    mix = ssm.mixing.linear.params
    Wq, sW, w_fmt = qz.weight("linear", i, mix["weight"], axis=1, model_q=mq.get("linear"))
    z_real = (y * s_y) @ (Wq * sW) + mix["bias"]
    za_fmt, zb_fmt = IntFormat.full(W["za"]), IntFormat.full(W["zb"])
    s_za = _calib_step(np.abs(z_real[..., :H]).max(), za_fmt, headroom)
    s_zb = _calib_step(min(np.abs(z_real[..., H:]).max(), GATE_RANGE), zb_fmt, headroom)
    mix_a, eps[p + "za"] = _linear("mix_a", Wq[:, :H], mix["bias"][:H], sW[:, :H], w_fmt, y_fmt, s_y, s_za, za_fmt,
                                   rule, p + "za")
    mix_b, eps[p + "zb"] = _linear("mix_b", Wq[:, H:], mix["bias"][H:], sW[:, H:], w_fmt, y_fmt, s_y, s_zb, zb_fmt,
                                   rule, p + "zb")
    steps.update({p + "W_a": sW[0, :H], p + "W_b": sW[0, H:], p + "za": np.float64(s_za), p + "zb": np.float64(s_zb)})
    za, _ = mix_a(y)
    zb, _ = mix_b(y)

    # the sigmoid table over every gate code; RNE(sigmoid * 2**F) (Python round: ties to even)
    sig_lut = np.array([round(v) for v in sigmoid(s_zb * np.arange(zb_fmt.qmin, zb_fmt.qmax + 1)) * 2.0 ** sig_bits],
                       dtype=np.int64)
    prod = za * sig_lut[zb - zb_fmt.qmin]
    act_fmt = qz.fmt("act", i)
    s_act = qz.act_steps(i, prod * (s_za / 2.0 ** sig_bits), mq.get("act"))
    # a wide product (za * sig): the shift comes from the int64 headroom, not a 31-bit multiplier
    bound = za_fmt.maxabs << sig_bits
    M, R, e = _one_term(s_za * 2.0 ** -sig_bits / s_act, np.full(H, bound), p + "glu", rule)
    glu = Requant("glu", [M], R, act_fmt, [bound])
    # twin's exact sigmoid vs the table: at most half a table LSB times |za|
    eps[p + "act"] = float(np.max(e + za_fmt.maxabs * s_za * 2.0 ** -(sig_bits + 1) / s_act))
    steps[p + "act"] = s_act
    act, _ = glu([prod])

    norm, residual = block.norm, block.residual
    post = None
    if post_free := (block.norm is None and not block.residual):
        if np.ptp(s_act) > 0:
            raise ValueError(f"layer {i}: per-channel act steps feed the next layer directly; the integer "
                             f"layer input has one step (add a norm, or quantize act per tensor)")
    out, out_fmt, s_out = act, act_fmt, float(s_act[0])
    if not post_free:
        if norm is not None:
            k, c = norm.folded()
        else:
            k, c = np.ones(H), np.zeros(H)
        if np.any(k == 0):
            raise ValueError(f"layer {i}: BatchNorm gain is 0 in channels {np.flatnonzero(k == 0).tolist()}")
        out_fmt = IntFormat.full(W["u"])
        real = k * (act * s_act + (u * s_u if residual else 0.0)) + c
        s_out = _calib_step(np.abs(real).max(), out_fmt, headroom)
        sign = np.where(k < 0, -1, 1).astype(np.int64)
        # the BatchNorm shift c is one more term (bound 1) of the shared shift, so its
        # integer offset has int64 headroom too; its sign goes into the offset word
        ratios, bounds = [np.abs(k) * s_act / s_out], [act_fmt.maxabs]
        if residual:
            ratios, bounds = ratios + [np.abs(k) * s_u / s_out], bounds + [u_fmt.maxabs]
        with_c = norm is not None and np.any(c != 0)
        c_ratio = np.where(c == 0, 1.0, np.abs(c) / s_out)  # ratio > 0 required; zeroed below
        mults, shifts = rule.choose(p + "post", [[r[h] for r in ratios] + ([c_ratio[h]] if with_c else [])
                                                 for h in range(H)],
                                    [bounds + ([1] if with_c else [])] * H, n_mults=len(ratios))
        Ms = [np.array([m[j] for m in mults], dtype=np.int64) for j in range(len(ratios))]
        R = np.array(shifts, dtype=np.int64)
        offset = None
        if with_c:
            offset = np.where(c == 0, 0, np.sign(c).astype(np.int64) * np.array([m[-1] for m in mults]))
        post = Requant("post", Ms, R, out_fmt, bounds, offset=offset, sign=sign)
        # multiplier error of every term and the offset's rounding (half a unit at the 2**R scale)
        eps[p + "out"] = float(np.max(_multi_eps(ratios, Ms, R, bounds) + (2.0 ** -(R + 1) if with_c else 0.0)))
        out, _ = post([act, u] if residual else [act])
        steps.update({p + "bn_k": k, p + "bn_c": c})
    steps[p + "out"] = np.float64(s_out)
    modes = None
    if drop_pruned:  # after the eps bounds, which are computed (as upper bounds) over every mode
        core, modes, mode_steps = _drop_zero_c_modes(core, {k: cs[k] for k in MODE_STEPS})
        steps.update({p + k: v for k, v in mode_steps.items()})
    layer = IntLayer(core, mix_a, mix_b, sig_lut, sig_bits, glu, post, residual, modes)
    return layer, out, out_fmt, s_out
