"""The quantization wiring of one S4D layer (``S4DQuant``): what ``S4D`` quantizes, where, and how.

``S4D(..., quant=QuantConfig(...), layer=i)`` builds one ``S4DQuant``; it owns

* the ``Quantizer`` children (built from the config and registered on the layer
  under the names below, so learned steps appear in the layer's ``.params`` and
  running ranges in their ``buffers``; a float layer has none);
* the parameter path of both modes: the (possibly quantized) Abar, Bbar, C, D the
  SSM core computes with (``ssm_params``) and the backward chaining the core's
  gradients through the quantizers and the discretization to the parameters
  (``ssm_params_backward``);
* the recurrent state quantizer (``state_quant``) and its learned step's gradient;
* the export of the evaluation-mode recurrent layer for the integer model
  (``export``, behind ``S4D.quantized_recurrent``) and the effective parameters
  (``effective``, behind ``S4D.effective_ssm``);
* the recurrent core frozen for streaming (``frozen_core`` -> ``CoreStep``, behind ``S4D.stepper``).

Where each target acts (H = d_model, M = d_state/2):

==============  =====================================  ==============================
child           convolution mode (the reference)        recurrent mode (Zhao et al.)
==============  =====================================  ==============================
``quant_A``     A = -exp(log_A_real) + i*A_imag before  -
                discretization (continuous only)
``quant_Abar``  Abar (discrete / frozen)                Abar (real and imaginary
                                                        parts separately by default)
``quant_B``     -                                       Bbar
``quant_C``     C (one scale for both parts by default) C
``quant_D``     - (the reference keeps D float)         D
``quant_dt``    log_dt, then dt = exp(.)                 log_dt, then dt = exp(.)
``quant_K``,    the kernel K and the input u, each with  -
``quant_u``     levels // 2 states (``state`` target)
``quant_x``     -                                       the state x after every update
                                                        (``state`` target, full levels)
``quant_linear`` the mixing weight (H, 2H); bias float  same
``quant_act``   the layer output after GLU              same
==============  =====================================  ==============================

Per-channel scales run over H (axis 0 of the (H, ...) parameters, the last axis
of activations, the 2H outputs of the mixing weight). The state's range comes
from ``quant_x``'s scale_mode: ``absmax`` (max |x| of this batch's float states,
like the reference's per-call scales), ``running`` (running buffers, an EMA
updated in training / calibration as below, frozen in eval), ``fixed``
(``fixed_range``) or ``learned`` (LSQ step, initialised to the float states'
absmax / qpos). Gradients pass every quantizer by its STE and then the
discretization, as in float.

The state's ``running`` range: in recurrent training it is updated after each
batch from the pre-quantization states the batch produced (max |w|, w the
clipped value the quantizer sees, from the quantized scan itself), and the
batch is quantized with the range from before it (one batch of lag); the first
batch initialises it from the float states. ``qs4d_np.quant.calibrate`` folds
in each batch's float states (max |x| of the float scan) instead.
"""
from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from qs4d_np.core.checks import check_sequence_input
from qs4d_np.quant.config import QuantConfig
from qs4d_np.quant.discrete import polar_backward
from qs4d_np.quant.grids import ROUNDING
from qs4d_np.quant.quantizer import Quantizer
from qs4d_np.quant.scan import ScanCache, StateQuant, state_absmax
from qs4d_np.quant.weights import WeightQuant
from qs4d_np.ssm.discretize import (continuous_A, discretize, discretize_backward, discretize_dt_A,
                                     discretize_dt_A_backward)

if TYPE_CHECKING:
    from qs4d_np.ssm.s4d import S4D

# The layer's quantizer keys, in the order their children are registered (checkpoint keys).
KEYS = ("A", "Abar", "B", "C", "D", "dt", "K", "u", "x", "linear", "act")
# Range sources that do not depend on the data being quantized (streaming, export without calib).
STATIC_SCALE_MODES = ("fixed", "running", "learned")


@dataclass(frozen=True)
class EffectiveSSM:
    """The SSM parameters an evaluation-mode forward computes with (``S4D.effective_ssm``).

    ``Abar``, ``Bbar``, ``C``: (H, M) complex128; ``D``: (H,) float64. Quantized
    where the config quantizes them in that mode (the fake-quant values), float
    otherwise. ``Abar_float``, ``Bbar_float``: (H, M) complex128, the values
    before the Abar / Bbar quantizers (after a quantized dt or A, if any); equal
    to ``Abar``, ``Bbar`` where those are not quantized.
    """

    Abar: np.ndarray
    Bbar: np.ndarray
    C: np.ndarray
    D: np.ndarray
    Abar_float: np.ndarray
    Bbar_float: np.ndarray


def _round(v: np.ndarray, mode: int) -> np.ndarray:
    """``kernels.fake_quant.round_code`` on an array, in v's dtype (rules by ``quant.grids.ROUNDING``)."""
    if mode == 0:
        return np.rint(v)
    if mode == 3:
        return np.floor(v)
    a = np.abs(v)
    f = np.floor(a)
    d = a - f
    up = d >= 0.5 if mode == 2 else (d > 0.5) | ((d == 0.5) & (v >= 0))
    r = np.where(up, f + v.dtype.type(1), f)
    return np.where(v >= 0, r, -r)


class S4DQuant:
    """The quantizers of one S4D layer and the code that applies them (module docstring).

    ``q[key]`` is the ``Quantizer`` of each key of ``KEYS`` or None (float);
    ``weight_quant`` swaps the quantized mixing weight into the layer's mixing.
    The layer's own helper: it reads the layer's parameters directly.
    """

    def __init__(self, layer: "S4D") -> None:
        # A weak back-reference: the layer owns this helper, and a strong one would make every layer
        # a reference cycle, freed (with its forward caches) only by the cyclic garbage collector.
        self._layer = weakref.ref(layer)
        self.q: dict[str, Quantizer | None] = dict.fromkeys(KEYS)
        self.weight_quant: WeightQuant | None = None
        if layer.quant is not None:
            self._build(layer.quant)
            self.init_param_steps()

    @property
    def layer(self) -> "S4D":
        return self._layer()

    def __deepcopy__(self, memo: dict) -> "S4DQuant":
        """A copy tied to the copy of its layer when the layer is being deep-copied (``memo``)."""
        new = copy.copy(self)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "_layer":
                setattr(new, key, copy.deepcopy(value, memo))
        new._layer = weakref.ref(memo.get(id(self.layer), self.layer))
        return new

    # -- building -------------------------------------------------------------
    def _make(self, cfg: QuantConfig, key: str, target: str, axis: int, channels: int, is_complex: bool,
              halve: bool = False, **extra: Any) -> None:
        """The quantizer of ``key`` (config ``target``; ``channels`` along ``axis`` when per channel),
        registered on the layer as child ``quant_<key>``; ``extra`` goes to the ``Quantizer``."""
        layer = self.layer
        o = cfg.options_for(target)
        n = channels if o["per_channel"] else 1
        if is_complex and o["complex_mode"] == "cartesian":
            n *= 2
        q = cfg.quantizer_for(target, layer.layer, axis=axis, n_scales=n, halve=halve, dtype=layer.dtype, **extra)
        if q is not None:
            q.name = f"{key}[{layer.layer}]" if layer.layer is not None else key
            self.q[key] = layer.add_child(f"quant_{key}", q)

    def _build(self, cfg: QuantConfig) -> None:
        layer, H = self.layer, self.layer.d_model
        make = self._make
        if layer.abar == "continuous":
            make(cfg, "A", "A", 0, H, True)  # A in convolution mode
        # Abar in recurrent mode (and always for discrete / frozen). Cartesian rounding can push a
        # point with |Abar| < 1 outside the unit circle, and the recurrence then grows like
        # |Abar_q|**L; ``abar_bound`` keeps the codes in the disk (QuantSpec.max_modulus).
        make(cfg, "Abar", "A", 0, H, True, **({"max_modulus": 1.0} if cfg.options_for("A")["abar_bound"] else {}))
        make(cfg, "B", "B", 0, H, True)
        make(cfg, "C", "C", 0, H, True)
        make(cfg, "D", "D", 0, H, False)
        if layer.abar == "continuous":
            make(cfg, "dt", "dt", 0, H, False)
        make(cfg, "K", "state", 0, H, False, halve=True)
        make(cfg, "u", "state", 2, H, False, halve=True)
        # The recurrent state: one range per tensor, per channel, or per channel and part.
        make(cfg, "x", "state", 0, H, True)
        if layer.mixing is not None:
            make(cfg, "linear", "linear", 1, 2 * H, False)
        make(cfg, "act", "act", 2, H, False)
        if self.q["linear"] is not None:
            self.weight_quant = WeightQuant(layer.mixing.linear, self.q["linear"])

    def init_param_steps(self) -> None:
        """(Re)initialise the learned steps of the parameter targets (A, Abar, B, C, D, dt) from the
        layer's current parameters (LSQ init); see ``S4D.init_param_steps``."""
        layer, p = self.layer, self.layer._params
        d = layer.discrete()
        A = None if layer.abar != "continuous" else continuous_A(p["log_A_real"], p["A_imag"])
        for key, value in (("A", A), ("Abar", d.Abar), ("B", d.Bbar), ("C", p["C"]), ("D", p["D"]),
                           ("dt", p.get("log_dt"))):
            q = self.q[key]
            if q is not None and q.scale_mode == "learned":
                q.reset_step()  # so the forward initialises it from the current value
                q.forward(value)
                q._cache = None

    # -- applying -------------------------------------------------------------
    def apply(self, key: str, x: np.ndarray, training: bool) -> np.ndarray:
        """x through the quantizer of ``key`` (x itself when that target is float)."""
        q = self.q[key]
        return x if q is None else q.forward(x, training=training)

    def unapply(self, key: str, grad: np.ndarray) -> np.ndarray:
        """The straight-through backward of ``apply`` (grad itself when float)."""
        q = self.q[key]
        return grad if q is None else q.backward(grad)

    @contextmanager
    def kept_caches(self) -> Iterator[None]:
        """Run inference inside without disturbing a pending backward: on exit every forward cache
        of the layer and its children (and the quantized mixing weight) is what it was."""
        W_q = None if self.weight_quant is None else self.weight_quant._W_q
        try:
            with self.layer.kept_caches():
                yield
        finally:
            if self.weight_quant is not None:
                self.weight_quant._W_q = W_q

    # -- the SSM parameters ---------------------------------------------------
    def ssm_params(self, training: bool, mode: str) -> tuple:
        """(Abar, Bbar, C, D, ctx): the (possibly quantized) parameters the core runs with in ``mode``,
        and the backward's context (``ctx["float"]`` = Abar, Bbar before their quantizers)."""
        p = self.layer._params
        recurrent = mode == "recurrent"
        ctx: dict = {}
        if self.layer.abar == "continuous":
            log_dt = self.apply("dt", p["log_dt"], training)
            if recurrent or self.q["A"] is None:
                d = discretize(log_dt, p["log_A_real"], p["A_imag"], p.get("B"), self.layer.disc)
                Abar = self.apply("Abar", d.Abar, training) if recurrent else d.Abar
            else:  # the reference: quantize A itself, then discretize
                A = self.apply("A", continuous_A(p["log_A_real"], p["A_imag"]), training)
                d = discretize_dt_A(np.exp(log_dt.astype(np.float64)), A, p.get("B"), self.layer.disc)
                ctx["A_quantized"] = True
                Abar = d.Abar
            ctx["d"] = d
            Bbar = d.Bbar
            ctx["float"] = (d.Abar, d.Bbar)
        else:
            ctx["Abar"] = self.layer._float_Abar()
            Abar = self.apply("Abar", ctx["Abar"], training)
            Bbar = p["Bbar"].astype(np.complex128)
            ctx["float"] = (ctx["Abar"], Bbar)
        C, D = self.apply("C", p["C"], training), p["D"]
        if recurrent:
            Bbar = self.apply("B", Bbar, training)
            D = self.apply("D", D, training)
        return Abar, Bbar, C, D, ctx

    def ssm_params_backward(self, mode: str, ctx: dict, g_Abar: np.ndarray, g_Bbar: np.ndarray,
                            g_C: np.ndarray, g_D: np.ndarray) -> dict[str, np.ndarray]:
        """Chain the core's gradients through the quantizers and the discretization to the parameters."""
        p = self.layer._params
        if mode == "recurrent":
            g_Bbar = self.unapply("B", g_Bbar)
            g_D = self.unapply("D", g_D)
        grads = {"C": self.unapply("C", g_C), "D": g_D}
        if self.layer.abar == "continuous":
            d = ctx["d"]
            if ctx.get("A_quantized"):
                g_dt, g_A, g_B = discretize_dt_A_backward(d, p.get("B"), g_Abar, g_Bbar)
                g_A = self.unapply("A", g_A)
                grads["log_A_real"] = np.real(g_A) * -np.exp(p["log_A_real"].astype(np.float64))
                grads["A_imag"] = np.imag(g_A)
                grads["log_dt"] = g_dt * d.dt[:, 0]
                if g_B is not None:
                    grads["B"] = g_B
            else:
                if mode == "recurrent":
                    g_Abar = self.unapply("Abar", g_Abar)
                grads.update(discretize_backward(d, p.get("B"), g_Abar, g_Bbar))
            grads["log_dt"] = self.unapply("dt", grads["log_dt"])
        else:
            g_Abar = self.unapply("Abar", g_Abar)  # also the learned step's gradient when frozen
            if self.layer.abar == "discrete":
                grads["Abar_rho"], grads["Abar_theta"] = polar_backward(p["Abar_rho"], ctx["Abar"], g_Abar)
            grads["Bbar"] = g_Bbar
        return grads

    def zero_unused_steps(self, mode: str) -> None:
        """Zero gradients for the learned steps of the other mode's data quantizers.

        They did not act on this output, but the optimizer needs an entry for every
        parameter, and a stale one must not be reapplied.
        """
        for key in ("x",) if mode == "conv" else ("K", "u"):
            q = self.q[key]
            if q is not None and q.scale_mode == "learned":
                q._grads["step"] = np.zeros_like(q._params["step"])

    def effective(self, mode: str) -> EffectiveSSM:
        """``ssm_params`` of an evaluation forward, every cache kept, as an ``EffectiveSSM``."""
        with self.kept_caches():
            Abar, Bbar, C, D, ctx = self.ssm_params(False, mode)
        Abar_f, Bbar_f = ctx["float"]
        c128 = np.complex128
        return EffectiveSSM(Abar.astype(c128), Bbar.astype(c128), C.astype(c128), D.astype(np.float64),
                            Abar_f.astype(c128), Bbar_f.astype(c128))

    # -- the recurrent state ----------------------------------------------------
    @property
    def runs_quant_scan(self) -> bool:
        """Whether recurrent mode runs the quantized-state scan (a state target or a clip)."""
        return self.q["x"] is not None or self.layer.state_clip is not None

    def state_quant(self, u: np.ndarray | None, Abar: np.ndarray, Bbar: np.ndarray,
                    training: bool = False) -> StateQuant:
        """The recurrent state quantizer for a forward on u (batch, L, H) with the core's Abar, Bbar (H, M).

        The range comes from ``quant_x``'s scale_mode: ``absmax`` takes this u's float states;
        ``running`` in training quantizes with the buffers from before this batch and returns
        a ``StateQuant`` whose observer folds the scan's pre-quantization state maxima into
        them after the forward (the first batch, and calibration, fold in this u's float
        states first instead); ``learned`` initialises its step from the float states once.
        ``u=None``: only a static range (fixed, calibrated running, initialised learned) will do.
        Returns ``StateQuant(None)`` for a float state.
        """
        q = self.q["x"]
        if q is None:
            return StateQuant(None)
        spec = q.spec
        # Scales: per tensor or channel (spec.axis), shared by or separate for the parts (complex_mode).
        per_channel, per_part = spec.axis is not None, spec.complex_mode == "cartesian"
        mode = q.scale_mode
        if mode == "absmean":
            raise ValueError("the state target's scale_mode='absmean' has no recurrent-mode meaning; "
                             "use absmax, running, fixed or learned")
        if not spec.symmetric:  # the state register is a signed code with zero point 0 (golden model, scan)
            raise ValueError("recurrent mode quantizes the state symmetrically, but the state target has "
                             "symmetric=False; set target_options={'state': {'symmetric': True}} (conv mode's "
                             "K and u may stay asymmetric)")

        def scale_order(absmax: np.ndarray) -> np.ndarray:
            """(H, 2) maxima -> the quantizer's scales (per channel: real parts' scales first)."""
            if per_channel:
                return absmax.T.reshape(-1) if per_part else absmax.max(axis=1)
            return absmax.max(axis=0) if per_part else absmax.max(keepdims=True).reshape(1)

        def float_state_range() -> np.ndarray:
            clip = np.inf if self.layer.state_clip is None else self.layer.state_clip
            return scale_order(state_absmax(u, Abar, Bbar, StateQuant(None), clip))  # (H, 2) first

        def fold(wmax: np.ndarray) -> None:
            r = scale_order(wmax)
            q.observe(-r, r)

        observer = None
        if u is not None and mode == "absmax":  # this batch's float states, like the reference
            r = float_state_range()
            inv, _ = spec.scales(-r, r, np.dtype(np.float64))
        else:
            if u is not None and mode == "learned" and not q.step_ready:
                q.set_step(np.maximum(float_state_range(), spec.min_range) / spec.code_grid.qpos)
            if u is not None and q.updates_range(training):
                if training and q.calibrated and not q.calibrating:
                    # quantize with the range from before this batch; the scan folds in the
                    # pre-quantization states it produces (one batch of lag, no float pass)
                    observer = fold
                else:  # the first batch and calibration: this batch's float states
                    r = float_state_range()
                    q.observe(-r, r)
            inv, _ = q.static_scales(np.dtype(np.float64))
        if per_part:  # (2H,) or (2,) -> (H, 2)
            inv = inv.reshape(2, -1).T if per_channel else np.tile(inv, (self.layer.d_model, 1))
        return StateQuant(spec, inv if per_channel or per_part else float(inv[0]), q.ste, observer)

    def state_step_grad(self, dstep: np.ndarray, scan_cache: ScanCache) -> None:
        """Learned state step: dL/dstep (the scan's) into ``quant_x.grads['step']``, LSQ-scaled."""
        q = self.q["x"]
        if q is None or q.scale_mode != "learned":
            return
        dstep = np.asarray(dstep, dtype=np.float64)  # shaped like the StateQuant's inv
        if dstep.ndim == 2:  # (H, 2): per channel and part, or per part tiled over channels
            flat = dstep.T.reshape(-1) if q.spec.axis is not None else dstep.sum(axis=0)
        else:
            flat = dstep.reshape(-1)
        g = 1.0
        if q.lsq_grad_scale:
            count = 2 * scan_cache.u.size * (self.layer.d_state // 2) / q.n_scales  # state entries per scale
            g = 1.0 / np.sqrt(count * q.spec.code_grid.qpos)
        q._grads["step"] = (flat * g).astype(q.dtype)

    # -- export ---------------------------------------------------------------------
    def _data_range_quantizer(self) -> str | None:
        """Names the first state / act quantizer whose range comes from the data it quantizes, if any."""
        for key, target in (("x", "state"), ("act", "act")):
            q = self.q[key]
            if q is not None and q.scale_mode not in STATIC_SCALE_MODES:
                return f"quantizer {q.name!r} (target {target!r}, scale_mode={q.scale_mode!r})"
        return None

    def export(self, calib: np.ndarray | None) -> dict[str, Any]:
        """``S4D.quantized_recurrent(calib)`` (its docstring describes the result)."""
        layer = self.layer
        q = self._data_range_quantizer()
        if calib is None and q is not None:
            raise ValueError(f"quantized_recurrent(): {q} takes its range from each tensor it quantizes; "
                             f"pass calib (batch, L, {layer.d_model}) to resolve it on that input as the forward "
                             f"would, or calibrate static ranges (scale_mode 'running' with "
                             f"qs4d_np.quant.calibrate, 'fixed' or 'learned')")
        if calib is not None:
            calib = np.ascontiguousarray(check_sequence_input("calib", calib, layer.d_model), dtype=layer.dtype)
        eff = self.effective("recurrent")

        def export(key: str, x: np.ndarray) -> Any:
            q = self.q[key]
            return x if q is None else q.quantize(x)

        out: dict[str, Any] = {"Abar": export("Abar", eff.Abar_float), "Bbar": export("B", eff.Bbar_float),
                               "C": export("C", layer._params["C"]), "D": export("D", layer._params["D"])}
        x = self.q["x"]
        data_range = x is not None and x.scale_mode == "absmax"
        out["state"] = None if x is None else self.state_quant(calib if data_range else None, eff.Abar, eff.Bbar)
        out["clip"] = np.inf if layer.state_clip is None else float(layer.state_clip)
        if layer.mixing is not None:
            out["linear"] = export("linear", layer.mixing.linear._params["weight"])
            out["linear_bias"] = layer.mixing.linear._params["bias"]
        act = self.q["act"]
        if act is None:
            out["act"] = None
        else:
            if act.scale_mode in STATIC_SCALE_MODES:
                inv, zp = act.static_scales(layer.dtype)
            else:  # the range of the layer's output on calib, as the forward quantizes it
                with self.kept_caches():
                    t = act.quantize(layer._pre_act(calib, False, "recurrent"))
                # (1, 1, n) -> (n,); the forward's inv is in the layer's dtype (the float64 copy is exact)
                inv, zp = t.inv_scale.reshape(-1).astype(layer.dtype), t.zero_point.reshape(-1)
            out["act"] = {"inv_scale": inv, "zero_point": zp.astype(np.int64), "grid": act.spec.code_grid,
                          "rounding": act.spec.rounding}
        return out

    # -- streaming ------------------------------------------------------------------
    def frozen_core(self, where: str = "step()") -> "CoreStep":
        """The evaluation-mode recurrent SSM core frozen for streaming (``CoreStep``): the quantized
        Abar, Bbar, C, D, the state clip and the state quantizer's scales, derived once now.

        The state and act ranges must be static (``fixed``, calibrated ``running``, initialised
        ``learned``); a data-dependent range raises ValueError naming the quantizer, prefixed by
        ``where`` (who asked). Leaves the forward caches untouched.
        """
        layer = self.layer
        q = self._data_range_quantizer()
        if q is not None:
            raise ValueError(f"{where}: {q} takes its range from the whole sequence it quantizes, which a "
                             f"stream does not have; calibrate static ranges (scale_mode 'running' with "
                             f"qs4d_np.quant.calibrate) or use 'fixed' or 'learned'")
        dtype = layer.dtype
        with self.kept_caches():
            Abar, Bbar, C, D, _ = self.ssm_params(False, "recurrent")
        st = self.state_quant(None, Abar, Bbar)
        clip = state = None
        if self.runs_quant_scan:
            clip = dtype.type(np.inf if layer.state_clip is None else layer.state_clip)
            if st.spec is not None:
                inv = st.per_channel_inv(layer.d_model, dtype)
                name = self.q["x"].name
                # like the scan kernel, no finiteness check on the state (it saturates)
                state = tuple(StaticQuant.of(st.spec, inv[:, i], None, f"{name} ({part})", dtype, False)
                              for i, part in enumerate(("real part", "imaginary part")))
        Abar, Bbar, C = (np.asarray(z, dtype=layer.cdtype) for z in (Abar, Bbar, C))
        return CoreStep(Abar, Bbar, C, np.asarray(D, dtype=dtype), clip, state)

    def frozen_act(self) -> "StaticQuant | None":
        """The act quantizer with its static range frozen for streaming (None without one); raises
        for an uncalibrated ``running`` or an unset ``learned`` range (``Quantizer.static_scales``)."""
        act = self.q["act"]
        if act is None:
            return None
        dtype = self.layer.dtype
        return StaticQuant.of(act.spec, *act.static_scales(dtype), act.name, dtype, True)


@dataclass(frozen=True)
class StaticQuant:
    """A fake quantizer with a frozen range, for streaming: x_hat = (clamp(round(x*inv) + zp,
    qmin, qmax) - zp) / inv per element in x's dtype, the rounding by ``rounding``
    (``quant.grids.ROUNDING`` code): the arithmetic of ``kernels.fake_quant`` (``zp`` None: the
    state quantizer of ``kernels.quant_scan``, which adds no zero point). ``inv``, ``zp``: per
    tensor (1,) or per channel (H,), broadcast over the last axis; read-only copies. ``name``
    names the quantizer in errors; ``check_finite``: raise on NaN / inf as ``kernels.fake_quant``
    does (the state quantizer of the scan kernel saturates instead).
    """

    inv: np.ndarray
    zp: np.ndarray | None
    qmin: np.floating
    qmax: np.floating
    rounding: int
    name: str
    check_finite: bool

    @classmethod
    def of(cls, spec: Any, inv: np.ndarray, zp: np.ndarray | None, name: str, dtype: np.dtype,
           check_finite: bool) -> "StaticQuant":
        """From a ``QuantSpec`` (its grid and rounding rule) and frozen scales, in ``dtype``."""
        arrays = []
        for a in (inv, zp):
            if a is not None:
                a = np.array(a, dtype=dtype)
                a.setflags(write=False)
            arrays.append(a)
        return cls(arrays[0], arrays[1], *spec.code_grid.bounds(dtype), ROUNDING[spec.rounding], name, check_finite)

    def apply(self, v: np.ndarray) -> np.ndarray:
        """Fake-quantize v (..., H) in place and return it."""
        if self.check_finite and not np.isfinite(v).all():
            raise ValueError(f"{self.name}: the stream's values contain {np.size(v) - np.isfinite(v).sum()} "
                             "non-finite value(s) (NaN or inf); cannot quantize")
        v *= self.inv
        if self.rounding == 0:  # ties to even, in place (the common case)
            np.rint(v, out=v)
        else:
            v[...] = _round(v, self.rounding)
        if self.zp is not None:
            v += self.zp
        np.clip(v, self.qmin, self.qmax, out=v)
        if self.zp is not None:
            v -= self.zp
        v /= self.inv
        return v


@dataclass(frozen=True)
class CoreStep:
    """One layer's evaluation-mode recurrent SSM core, frozen for streaming (``S4DQuant.frozen_core``).

    ``Abar``, ``Bbar``, ``C``: the (quantized) parameters (H, M) in the layer's complex dtype;
    ``D`` (H,) in its dtype. ``clip``: the state bound (inf when only the state is quantized), or
    None when the forward runs the float scan (no state target, no clip). ``state``: the state
    quantizer of the real and of the imaginary part (``StaticQuant``, codes per unit (H,)), or
    None for a float state. The arrays are read-only copies: a stream never sees a later change
    of the layer.

    ``step(u_t, state)``: u_t (batch, H) in the layer's dtype and the state **mode-major**, (M,
    batch, H) in its complex dtype, so that every elementwise pass and each mode's read-out add
    runs over contiguous memory (unchecked: the callers check). Returns y_t (batch, H) in the
    layer's dtype (the core output, D*u_t included) and the new state (M, batch, H). With a clip
    this is ``kernels.quant_scan``'s documented per-step order on real and imaginary planes,
    vectorised over batch and channels: state update in the layer dtype, clip, round / saturate /
    divide, read-out accumulated in float64 over the modes in order 0..M-1 (one add per mode), so
    it reproduces the forward bit for bit. Without a clip the forward runs ``kernels.scan``, whose
    sums may be reassociated (fastmath): the step then uses complex arithmetic and a summed
    read-out and agrees with it to rounding only.
    """

    Abar: np.ndarray
    Bbar: np.ndarray
    C: np.ndarray
    D: np.ndarray
    clip: np.floating | None
    state: tuple[StaticQuant, StaticQuant] | None

    def __post_init__(self) -> None:
        for name in ("Abar", "Bbar", "C", "D"):
            value = getattr(self, name).copy()
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        # Abar, Bbar, C as (M, 1, H), complex and as real / imaginary planes
        modes = [np.ascontiguousarray(z.T[:, None, :]) for z in (self.Abar, self.Bbar, self.C)]
        planes = [np.ascontiguousarray(part) for z in modes for part in (z.real, z.imag)]
        for a in modes + planes:
            a.setflags(write=False)
        object.__setattr__(self, "_modes", tuple(modes))
        object.__setattr__(self, "_planes", tuple(planes))

    def step(self, u_t: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(y_t (batch, H), new state (M, batch, H)) of one step; see the class docstring."""
        if self.clip is None:
            A, B, C = self._modes
            x = A * state
            x += B * u_t
            y = 2 * (C * x).real.sum(axis=0) + self.D * u_t
            return y, x
        ar, ai, br, bi, cr, ci = self._planes
        xr, xi = state.real.copy(), state.imag.copy()
        tmp = np.empty_like(xr)
        vr = np.multiply(ar, xr)  # vr = (ar*xr - ai*xi) + br*u
        vr -= np.multiply(ai, xi, out=tmp)
        vr += np.multiply(br, u_t, out=tmp)
        vi = np.multiply(ar, xi, out=xi)  # vi = (ar*xi + ai*xr) + bi*u; x_{t-1}'s imaginary part is done
        vi += np.multiply(ai, xr, out=tmp)
        vi += np.multiply(bi, u_t, out=tmp)
        for i, v in enumerate((vr, vi)):
            if np.isfinite(self.clip):
                np.clip(v, -self.clip, self.clip, out=v)
            if self.state is not None:
                self.state[i].apply(v)
        terms = np.multiply(cr, vr, out=tmp)
        terms -= np.multiply(ci, vi, out=xr)  # x_{t-1}'s real part is done too
        terms = terms.astype(np.float64)  # exact; the kernel adds each float32 term to a float64 acc
        if terms[0].size > 1:
            # the modes axis is not the fast one in memory, so numpy adds the (batch, H) rows one by
            # one in order 0..M-1 (pairwise summation only runs along the fast axis: np.sum's notes)
            acc = np.add.reduce(terms, axis=0)
        else:
            acc = terms[0].copy()
            for n in range(1, terms.shape[0]):
                acc += terms[n]
        y = (2.0 * acc + self.D * u_t).astype(self.D.dtype)
        x = np.empty(state.shape, dtype=state.dtype)
        x.real, x.imag = vr, vi
        return y, x
