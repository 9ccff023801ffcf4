"""Export's quantization pieces: a quantized target's codes, steps and format (``ExportQuantizer``),
a calibrated step (``calib_step``), a one-term requantization's multipliers (``one_term``) and an
integer Linear with its bias at the product scale (``int_linear``).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from qs4d_np.golden.fixedpoint import IntFormat
from qs4d_np.golden.model import IntLinear
from qs4d_np.golden.multiplier import ShiftRule
from qs4d_np.quant.config import QuantConfig
from qs4d_np.quant.fake import quantize
from qs4d_np.quant.scan import StateQuant, state_absmax


class ExportQuantizer:
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


def calib_step(absmax: float, fmt: IntFormat, headroom: float) -> float:
    """The step that puts ``absmax * headroom`` on the format's largest code (absmax 0: a tiny step)."""
    return max(float(absmax), 1e-12) * headroom / fmt.qmax


def one_term(ratios: np.ndarray, bounds: np.ndarray, name: str, rule: ShiftRule
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


def int_linear(name: str, W: np.ndarray, b: np.ndarray, s_W: np.ndarray, w_fmt: IntFormat, in_fmt: IntFormat,
               s_in: float, s_out: float, out_fmt: IntFormat, rule: ShiftRule, site: str | None = None
               ) -> tuple[IntLinear, float]:
    """An IntLinear with the bias at the product scale; also its local eps (output LSBs)."""
    s_W = np.broadcast_to(s_W, W.shape)[0]  # per output column
    b_int = np.array([round(v) for v in np.asarray(b, dtype=np.float64) / (s_W * s_in)], dtype=np.int64)
    # the bound IntLinear proves headroom with (one for all outputs)
    acc = np.full(W.shape[1], W.shape[0] * w_fmt.maxabs * in_fmt.maxabs + int(np.abs(b_int).max()), dtype=object)
    M, R, eps = one_term(s_W * s_in / s_out, acc, site or name, rule)
    return IntLinear(name, W, b_int, w_fmt, in_fmt, M, R, out_fmt), float(np.max(eps))
