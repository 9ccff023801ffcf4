"""One block of the integer model from the trained block (``export_layer``): the SSM core's codes
and multipliers, the GLU mixing with its sigmoid table, the folded BatchNorm and residual, each
rounded tensor's local agreement bound eps (docs/integer_spec.md section 6), and the pruned
modes dropped from the core (``_drop_zero_c_modes``).
"""
from __future__ import annotations

import numpy as np

from qs4d_np.golden.export_quant import ExportQuantizer, calib_step, int_linear, one_term
from qs4d_np.golden.fixedpoint import IntFormat
from qs4d_np.golden.layer import SSMCore, SSMCoreFormats
from qs4d_np.golden.model import IntLayer, ModeMap, Requant
from qs4d_np.golden.multiplier import ShiftRule, ssm_core_multipliers
from qs4d_np.golden.twin import sigmoid
from qs4d_np.models.block import S4DBlock
from qs4d_np.quant.scan import StateQuant, quant_scan

# Steps with one value per mode (H, N2): compacted with the core when modes are dropped.
MODE_STEPS = ("Abar_re", "Abar_im", "Bbar_re", "Bbar_im")
# The gate grid never spans more than +-GATE_RANGE: sigmoid(16) rounds to 2**15 / 2**15 already.
GATE_RANGE = 16.0


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


def export_layer(i: int, block: S4DBlock, qz: ExportQuantizer, u: np.ndarray, u_fmt: IntFormat, s_u: float,
                 W: dict, headroom: float, sig_bits: int, steps: dict, eps: dict, p: str, drop_pruned: bool,
                 rule: ShiftRule, shared_state_step: bool) -> tuple[IntLayer, np.ndarray, IntFormat, float]:
    """Block ``i`` (names prefixed ``p``) as an ``IntLayer``, from its input codes ``u`` (format
    ``u_fmt``, step ``s_u``) -> (the layer, its output codes, their format and step). Records every
    step in ``steps`` and every local eps bound in ``eps``; the other arguments are ``from_model``'s."""
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
    s_y = calib_step(np.abs(y_real).max(), y_fmt, headroom)
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
    s_za = calib_step(np.abs(z_real[..., :H]).max(), za_fmt, headroom)
    s_zb = calib_step(min(np.abs(z_real[..., H:]).max(), GATE_RANGE), zb_fmt, headroom)
    mix_a, eps[p + "za"] = int_linear("mix_a", Wq[:, :H], mix["bias"][:H], sW[:, :H], w_fmt, y_fmt, s_y, s_za, za_fmt,
                                      rule, p + "za")
    mix_b, eps[p + "zb"] = int_linear("mix_b", Wq[:, H:], mix["bias"][H:], sW[:, H:], w_fmt, y_fmt, s_y, s_zb, zb_fmt,
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
    M, R, e = one_term(s_za * 2.0 ** -sig_bits / s_act, np.full(H, bound), p + "glu", rule)
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
        s_out = calib_step(np.abs(real).max(), out_fmt, headroom)
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
