"""The S4D layer: diagonal SSM (convolution or recurrent mode) -> activation -> dropout -> mixing.

Block order as in the state-spaces S4D example: y = SSM(u) + D*u, then
activation (GELU by default), channel dropout, pointwise H -> 2H + GLU. The
residual connection and the norm belong to the model's block, not here.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from qs4d_np.core.activations import GELU, ReLU
from qs4d_np.core.checks import (check_array, check_choice, check_float, check_grad_like, check_int,
                                 check_sequence_input)
from qs4d_np.core.dropout import Dropout
from qs4d_np.core.mixing import PointwiseGLU
from qs4d_np.core.module import Module
from qs4d_np.kernels.scan import scan, scan_backward
from qs4d_np.quant.config import QuantConfig
from qs4d_np.quant.discrete import polar_abar, polar_backward, polar_params
from qs4d_np.quant.quantizer import Quantizer
from qs4d_np.quant.scan import StateQuant, quant_scan, quant_scan_backward, state_absmax
from qs4d_np.quant.weights import WeightQuant
from qs4d_np.ssm.discretize import (DISCRETIZATIONS, DiscreteSSM, continuous_A, discretize, discretize_backward,
                                     discretize_dt_A, discretize_dt_A_backward)
from qs4d_np.ssm.fftconv import causal_conv, causal_conv_backward
from qs4d_np.ssm.kernel import ssm_kernel, ssm_kernel_backward

INITS = ("lin", "inv", "real", "qs4d")
ACTIVATIONS = {"gelu": GELU, "relu": ReLU, None: None}
MIXINGS = ("glu", None)
MODES = ("conv", "recurrent")
ABARS = ("continuous", "discrete", "frozen")


def init_A(init: str, H: int, d_state: int) -> tuple[np.ndarray, np.ndarray]:
    """(log_A_real, A_imag), each (H, d_state/2) float64, for one of ``INITS``."""
    n = np.arange(d_state // 2, dtype=np.float64)
    log_A_real = np.full(n.shape, math.log(0.5))
    if init == "lin":
        A_imag = math.pi * n
    elif init == "qs4d":
        A_imag = math.pi * n / 4
    elif init == "inv":
        A_imag = d_state / math.pi * (d_state / (2 * n + 1) - 1)
    else:  # "real": A = -(n + 1)
        log_A_real = np.log(n + 1)
        A_imag = np.zeros_like(n)
    return np.tile(log_A_real, (H, 1)), np.tile(A_imag, (H, 1))


def _inference(op: Module, x: np.ndarray) -> np.ndarray:
    """op.forward(x) for streaming, keeping the op's cache so a pending backward still works."""
    saved = op._cache
    try:
        return op.forward(x, training=False)
    finally:
        op._cache = saved


class S4D(Module):
    """S4D layer on (batch, length, d_model) inputs, optionally quantization-aware.

    Parameters (H = d_model, M = d_state/2 complex modes), by ``abar``:

    * ``"continuous"`` (default): ``log_dt`` (H,), ``log_A_real`` (H, M), ``A_imag``
      (H, M) and, with ``learn_B``, ``B`` (H, M) complex (initialised to ones);
      Abar, Bbar come from the discretization ``disc``;
    * ``"discrete"``: Abar learned directly as ``Abar_rho``, ``Abar_theta`` (H, M) with
      Abar = exp(-softplus(rho) + i*theta), always inside the unit circle
      (``qs4d_np.quant.discrete``), and ``Bbar`` (H, M) complex; both initialised
      from the discretized initial A and dt;
    * ``"frozen"``: Abar fixed at its initial discretized value (buffer ``Abar``, not a
      parameter; with an ``A`` quantizer it is used at its quantized value), ``Bbar``
      learned as for ``discrete``.

    Always ``C`` (H, M) complex and ``D`` (H,). Children ``activation``,
    ``dropout`` and ``mixing`` exist when enabled.

    ``forward(u, training, mode)`` runs the SSM as an FFT convolution with the
    kernel K (``mode="conv"``) or as the Numba recurrence (``"recurrent"``);
    without quantization both give the same outputs and parameter gradients up
    to rounding.

    Quantization (``quant``, a ``QuantConfig``; ``layer`` picks per-layer levels).
    Each target the config quantizes becomes a ``Quantizer`` child, so learned
    steps appear in ``.params`` and running ranges in their ``buffers``:

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

    Per-channel scales run over H (axis 0 of the (H, ...) parameters, the last
    axis of activations, the 2H outputs of the mixing weight). Recurrent mode
    with a ``state`` target runs ``qs4d_np.quant.quant_scan``; the state's range
    comes from ``quant_x``'s scale_mode: ``absmax`` (max |x| of this batch's float
    states, like the reference's per-call scales), ``running`` (that absmax
    folded into running buffers in training / calibration, frozen in eval),
    ``fixed`` (``fixed_range``) or ``learned`` (LSQ step, initialised to the float
    states' absmax / qpos). ``state_clip`` bounds |Re x|, |Im x| at every step
    before quantizing (None: no clip beyond the quantizer's saturation); without a
    ``state`` target and without a clip, recurrent mode runs the float scan with
    the quantized parameters. Gradients pass every quantizer by its STE and then
    the discretization, as in float.
    """

    def __init__(self, d_model: int, d_state: int = 64, *, init: str = "lin", disc: str = "zoh",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, activation: str | None = "gelu",
                 mixing: str | None = "glu", dropout: float = 0.0, learn_B: bool = False,
                 dtype: type = np.float32, seed: int | np.random.Generator | None = None,
                 quant: QuantConfig | None = None, layer: int | None = None, abar: str = "continuous",
                 state_clip: float | None = None) -> None:
        super().__init__()
        H = check_int("d_model", d_model, min_value=1)
        N = check_int("d_state", d_state, min_value=2)
        if N % 2:
            raise ValueError(f"d_state must be even (N/2 complex modes), got {N}")
        check_choice("init", init, INITS)
        check_choice("disc", disc, DISCRETIZATIONS)
        check_choice("activation", activation, tuple(ACTIVATIONS))
        check_choice("mixing", mixing, MIXINGS)
        check_choice("abar", abar, ABARS)
        dt_min = check_float("dt_min", dt_min, min_value=0.0, min_inclusive=False)
        dt_max = check_float("dt_max", dt_max)
        if dt_max <= dt_min:
            raise ValueError(f"dt_max must be > dt_min, got dt_min={dt_min}, dt_max={dt_max}")
        dropout = check_float("dropout", dropout, min_value=0.0, max_value=1.0, max_inclusive=False)
        if not isinstance(learn_B, (bool, np.bool_)):
            raise TypeError(f"learn_B must be a bool, got {learn_B!r}")
        if learn_B and abar != "continuous":
            raise ValueError(f"learn_B applies to abar='continuous'; abar={abar!r} learns Bbar directly")
        if quant is not None and not isinstance(quant, QuantConfig):
            raise TypeError(f"quant must be a QuantConfig or None, got {type(quant).__name__}")
        if layer is not None:
            layer = check_int("layer", layer, min_value=0)
        if state_clip is not None:
            state_clip = check_float("state_clip", state_clip, min_value=0.0, min_inclusive=False)
        self.dtype = np.dtype(dtype)
        check_choice("dtype", self.dtype, (np.dtype(np.float32), np.dtype(np.float64)))
        self.cdtype = np.result_type(self.dtype, np.complex64)
        self.d_model, self.d_state, self.disc, self.init = H, N, disc, init
        self.abar, self.quant, self.layer, self.state_clip = abar, quant, layer, state_clip
        self.buffers: dict[str, np.ndarray] = {}
        M = N // 2

        rng = np.random.default_rng(seed)
        log_A_real, A_imag = init_A(init, H, N)
        p = self._params
        p["log_dt"] = rng.uniform(math.log(dt_min), math.log(dt_max), H).astype(self.dtype)
        p["log_A_real"] = log_A_real.astype(self.dtype)
        p["A_imag"] = A_imag.astype(self.dtype)
        p["C"] = (math.sqrt(0.5) * (rng.standard_normal((H, M)) + 1j * rng.standard_normal((H, M)))).astype(self.cdtype)
        p["D"] = rng.standard_normal(H).astype(self.dtype)
        if learn_B:
            p["B"] = np.ones((H, M), dtype=self.cdtype)
        if abar != "continuous":
            d = discretize(p["log_dt"], log_A_real, A_imag, None, disc)
            for name in ("log_dt", "log_A_real", "A_imag"):
                del p[name]
            self.set_discrete(d.Abar, d.Bbar)
        dropout_rng, mixing_rng = rng.spawn(2)

        self.activation = None if activation is None else self.add_child("activation", ACTIVATIONS[activation]())
        self.dropout = self.add_child("dropout", Dropout(dropout, seed=dropout_rng)) if dropout > 0 else None
        self.mixing = (self.add_child("mixing", PointwiseGLU(H, dtype=self.dtype, seed=mixing_rng))
                       if mixing == "glu" else None)
        self._build_quantizers()

    # -- quantizers ---------------------------------------------------------
    def _build_quantizers(self) -> None:
        cfg, H = self.quant, self.d_model
        names = ("A", "Abar", "B", "C", "D", "dt", "K", "u", "x", "linear", "act")
        self.q: dict[str, Quantizer | None] = dict.fromkeys(names)
        if cfg is None:
            self.weight_quant = None
            return

        def make(key: str, target: str, axis: int, channels: int, is_complex: bool,
                 halve: bool = False) -> None:
            o = cfg.options_for(target)
            n = channels if o["per_channel"] else 1
            if is_complex and o["complex_mode"] == "cartesian":
                n *= 2
            q = cfg.quantizer_for(target, self.layer, axis=axis, n_scales=n, halve=halve, dtype=self.dtype)
            if q is not None:
                q.name = f"{key}[{self.layer}]" if self.layer is not None else key
                self.q[key] = self.add_child(f"quant_{key}", q)

        if self.abar == "continuous":
            make("A", "A", 0, H, True)  # A in convolution mode
        make("Abar", "A", 0, H, True)  # Abar in recurrent mode (and always for discrete / frozen)
        make("B", "B", 0, H, True)
        make("C", "C", 0, H, True)
        make("D", "D", 0, H, False)
        if self.abar == "continuous":
            make("dt", "dt", 0, H, False)
        make("K", "state", 0, H, False, halve=True)
        make("u", "state", 2, H, False, halve=True)
        # The recurrent state: one range per tensor, per channel, or per channel and part.
        make("x", "state", 0, H, True)
        if self.mixing is not None:
            make("linear", "linear", 1, 2 * H, False)
        make("act", "act", 2, H, False)
        self.weight_quant = (WeightQuant(self.mixing.linear, self.q["linear"])
                             if self.q["linear"] is not None else None)
        self.init_param_steps()

    def init_param_steps(self) -> None:
        """(Re)initialise the learned steps of the parameter targets (A, Abar, B, C, D, dt) from the
        current parameters (LSQ init). Runs at construction, so no uninitialised step is left for a target
        the training mode never reaches; ``quant.with_quant`` runs it again after copying weights."""
        d = self.discrete()
        A = None if self.abar != "continuous" else continuous_A(self._params["log_A_real"], self._params["A_imag"])
        for key, value in (("A", A), ("Abar", d.Abar), ("B", d.Bbar),
                           ("C", self._params["C"]), ("D", self._params["D"]),
                           ("dt", self._params.get("log_dt"))):
            q = self.q[key]
            if q is not None and q.scale_mode == "learned":
                q.reset_step()  # so the forward initialises it from the current value
                q.forward(value)
                q._cache = None

    def _quant(self, key: str, x: np.ndarray, training: bool) -> np.ndarray:
        q = self.q[key]
        return x if q is None else q.forward(x, training=training)

    def _unquant(self, key: str, grad: np.ndarray) -> np.ndarray:
        q = self.q[key]
        return grad if q is None else q.backward(grad)

    # -- the SSM core -------------------------------------------------------
    def set_discrete(self, Abar: np.ndarray, Bbar: np.ndarray) -> None:
        """Set Abar and Bbar (H, M) complex of a ``discrete`` or ``frozen`` layer (e.g. from a float model)."""
        if self.abar == "continuous":
            raise ValueError("set_discrete needs abar='discrete' or 'frozen'; a continuous layer learns A and dt")
        shape = (self.d_model, self.d_state // 2)
        Abar = check_array("Abar", Abar, shape=shape, allow_complex=True)
        Bbar = check_array("Bbar", Bbar, shape=shape, allow_complex=True)
        if self.abar == "discrete":
            rho, theta = polar_params(Abar.astype(np.complex128))
            self._params["Abar_rho"] = rho.astype(self.dtype)
            self._params["Abar_theta"] = theta.astype(self.dtype)
        else:
            self.buffers["Abar"] = Abar.astype(self.cdtype)
        self._params["Bbar"] = Bbar.astype(self.cdtype)

    def _float_Abar(self) -> np.ndarray:
        if self.abar == "discrete":
            return polar_abar(self._params["Abar_rho"], self._params["Abar_theta"])
        return self.buffers["Abar"].astype(np.complex128)

    def _float_Bbar(self) -> np.ndarray:
        if self.abar == "continuous":
            return self.discrete().Bbar
        return self._params["Bbar"].astype(np.complex128)

    def discrete(self) -> DiscreteSSM:
        """The current float (Abar, Bbar) and intermediates, complex128 (no quantization).

        For abar 'discrete' / 'frozen' only ``Abar``, ``Bbar`` (= ``Bbar0``) are set;
        ``dt`` and ``A`` are None.
        """
        p = self._params
        if self.abar != "continuous":
            Bbar = self._float_Bbar()
            return DiscreteSSM(self.abar, None, None, self._float_Abar(), Bbar, Bbar)  # type: ignore[arg-type]
        return discretize(p["log_dt"], p["log_A_real"], p["A_imag"], p.get("B"), self.disc)

    def kernel(self, L: int) -> np.ndarray:
        """The float convolution kernel K (H, L) in the layer's dtype."""
        L = check_int("L", L, min_value=1)
        d = self.discrete()
        return ssm_kernel(self._params["C"] * d.Bbar, d.Abar, L).astype(self.dtype)

    def _ssm_params(self, training: bool, mode: str) -> tuple:
        """The (possibly quantized) Abar, Bbar, C, D the core runs with, and the backward's context."""
        p = self._params
        recurrent = mode == "recurrent"
        ctx: dict = {}
        if self.abar == "continuous":
            log_dt = self._quant("dt", p["log_dt"], training)
            if recurrent or self.q["A"] is None:
                d = discretize(log_dt, p["log_A_real"], p["A_imag"], p.get("B"), self.disc)
                Abar = self._quant("Abar", d.Abar, training) if recurrent else d.Abar
            else:  # the reference: quantize A itself, then discretize
                A = self._quant("A", continuous_A(p["log_A_real"], p["A_imag"]), training)
                d = discretize_dt_A(np.exp(log_dt.astype(np.float64)), A, p.get("B"), self.disc)
                ctx["A_quantized"] = True
                Abar = d.Abar
            ctx["d"] = d
            Bbar = d.Bbar
        else:
            ctx["Abar"] = self._float_Abar()
            Abar = self._quant("Abar", ctx["Abar"], training)
            Bbar = p["Bbar"].astype(np.complex128)
        C, D = self._quant("C", p["C"], training), p["D"]
        if recurrent:
            Bbar = self._quant("B", Bbar, training)
            D = self._quant("D", D, training)
        return Abar, Bbar, C, D, ctx

    def _ssm_params_backward(self, mode: str, ctx: dict, g_Abar: np.ndarray, g_Bbar: np.ndarray,
                             g_C: np.ndarray, g_D: np.ndarray) -> dict[str, np.ndarray]:
        """Chain the core's gradients through the quantizers and the discretization to the parameters."""
        p = self._params
        if mode == "recurrent":
            g_Bbar = self._unquant("B", g_Bbar)
            g_D = self._unquant("D", g_D)
        grads = {"C": self._unquant("C", g_C), "D": g_D}
        if self.abar == "continuous":
            d = ctx["d"]
            if ctx.get("A_quantized"):
                g_dt, g_A, g_B = discretize_dt_A_backward(d, p.get("B"), g_Abar, g_Bbar)
                g_A = self._unquant("A", g_A)
                grads["log_A_real"] = np.real(g_A) * -np.exp(p["log_A_real"].astype(np.float64))
                grads["A_imag"] = np.imag(g_A)
                grads["log_dt"] = g_dt * d.dt[:, 0]
                if g_B is not None:
                    grads["B"] = g_B
            else:
                if mode == "recurrent":
                    g_Abar = self._unquant("Abar", g_Abar)
                grads.update(discretize_backward(d, p.get("B"), g_Abar, g_Bbar))
            grads["log_dt"] = self._unquant("dt", grads["log_dt"])
        else:
            g_Abar = self._unquant("Abar", g_Abar)  # also the learned step's gradient when frozen
            if self.abar == "discrete":
                grads["Abar_rho"], grads["Abar_theta"] = polar_backward(p["Abar_rho"], ctx["Abar"], g_Abar)
            grads["Bbar"] = g_Bbar
        return grads

    def _state_quant(self, u: np.ndarray | None, Abar: np.ndarray, Bbar: np.ndarray, training: bool) -> StateQuant:
        """The recurrent state quantizer for this forward (range from ``quant_x``'s scale_mode).

        ``u=None`` (export): only a static range (fixed, calibrated running, learned) will do.
        """
        q = self.q["x"]
        spec = q.spec
        # Scales: per tensor or channel (spec.axis), shared by or separate for the parts (complex_mode).
        per_channel, per_part = spec.axis is not None, spec.complex_mode == "cartesian"
        mode = q.scale_mode
        if mode == "absmean":
            raise ValueError("the state target's scale_mode='absmean' has no recurrent-mode meaning; "
                             "use absmax, running, fixed or learned")

        def float_state_range() -> np.ndarray:
            clip = np.inf if self.state_clip is None else self.state_clip
            absmax = state_absmax(u, Abar, Bbar, StateQuant(None), clip)  # (H, 2)
            if per_channel:  # Quantizer order: real parts' scales first
                return absmax.T.reshape(-1) if per_part else absmax.max(axis=1)
            return absmax.max(axis=0) if per_part else absmax.max(keepdims=True).reshape(1)

        if u is not None and mode == "absmax":  # this batch's float states, like the reference
            r = float_state_range()
            inv, _ = spec.scales(-r, r, np.dtype(np.float64))
        else:
            if u is not None and mode == "learned" and not q.step_ready:
                q.set_step(np.maximum(float_state_range(), spec.min_range) / spec.code_grid.qpos)
            if u is not None and q.updates_range(training):
                r = float_state_range()
                q.observe(-r, r)
            inv, _ = q.static_scales(np.dtype(np.float64))
        if per_part:  # (2H,) or (2,) -> (H, 2)
            inv = inv.reshape(2, -1).T if per_channel else np.tile(inv, (self.d_model, 1))
        return StateQuant(spec, inv if per_channel or per_part else float(inv[0]), q.ste)

    def quantized_recurrent(self) -> dict[str, Any]:
        """The quantized tensors the evaluation-mode recurrent forward uses, for the integer golden model.

        H = d_model, M = d_state/2. Every ``QuantTensor`` t holds int64 codes ``t.q`` and
        float64 ``t.inv_scale`` (codes per unit) and int64 ``t.zero_point``, broadcastable
        to ``t.q``, on the grid ``t.grid`` (qmin..qmax); each real value is
        (code - zero_point) / inv_scale (``t.dequantize()``, bit for bit the fake-quant
        value the forward computes). Complex tensors stack (real, imaginary) codes in a
        leading axis of 2. A target the config leaves float comes as a float array instead.

        * ``Abar``, ``Bbar``: (2, H, M) codes (or (H, M) complex128): Abar after the
          discretization of the quantized dt (continuous) or the learned / frozen Abar;
          Bbar likewise (B = 1 folded in unless learned);
        * ``C``: (2, H, M) codes (or (H, M) complex); ``D``: (H,) codes (or (H,) float);
        * ``state``: the ``StateQuant`` (spec: grid, rounding; ``inv`` scalar, (H,) or
          (H, 2) codes per unit of the real / imaginary state) or None when the state is
          float; per step the scan computes v = Abar*x + Bbar*u_t, clips each part to
          [-clip, clip], then x = clamp(round(v*inv), qmin, qmax) / inv
          (``kernels.quant_scan``'s docstring has the exact order);
        * ``clip``: the state bound (inf = none); y_t = 2*Re(sum_n C x_t) + D*u_t;
        * ``linear``: the mixing weight (H, 2H) codes (or float), ``linear_bias`` (2H,) float;
        * ``act``: the output quantizer's static scales {"inv_scale", "zero_point" (per
          tensor: (1,), per channel: (H,)), "grid", "rounding"} or None. The layer's input
          is the previous layer's (or the encoder's) output; recurrent mode does not
          quantize it again here.

        Needs static ranges where ranges are data-dependent: the state and ``act`` must use
        ``fixed``, calibrated ``running`` or ``learned`` scales (absmax ranges would change
        with every batch). Leaves the forward caches untouched.
        """
        if self.quant is None:
            raise ValueError("quantized_recurrent() needs a layer built with quant=QuantConfig(...)")
        p = self._params

        def export(key: str, x: np.ndarray) -> tuple[Any, np.ndarray]:
            q = self.q[key]
            if q is None:
                return x, x
            t = q.quantize(x)
            return t, t.dequantize()

        if self.abar == "continuous":
            _, log_dt = export("dt", p["log_dt"])
            d = discretize(log_dt, p["log_A_real"], p["A_imag"], p.get("B"), self.disc)
            Abar_f, Bbar_f = d.Abar, d.Bbar
        else:
            Abar_f, Bbar_f = self._float_Abar(), p["Bbar"].astype(np.complex128)
        out: dict[str, Any] = {}
        out["Abar"], Abar = export("Abar", Abar_f)
        out["Bbar"], Bbar = export("B", Bbar_f)
        out["C"], _ = export("C", p["C"])
        out["D"], _ = export("D", p["D"])
        out["state"] = None if self.q["x"] is None else self._state_quant(None, Abar, Bbar, training=False)
        out["clip"] = np.inf if self.state_clip is None else float(self.state_clip)
        if self.mixing is not None:
            out["linear"], _ = export("linear", self.mixing.linear._params["weight"])
            out["linear_bias"] = self.mixing.linear._params["bias"]
        act = self.q["act"]
        if act is None:
            out["act"] = None
        else:
            inv, zp = act.static_scales(np.dtype(np.float64))
            out["act"] = {"inv_scale": inv, "zero_point": zp.astype(np.int64), "grid": act.spec.code_grid,
                          "rounding": act.spec.rounding}
        return out

    def _core_forward(self, u: np.ndarray, training: bool, mode: str) -> np.ndarray:
        Abar, Bbar, C, D, ctx = self._ssm_params(training, mode)
        if mode == "conv":
            Ct = C * Bbar
            K = ssm_kernel(Ct, Abar, u.shape[1])
            if self.q["K"] is not None:
                K = self.q["K"].forward(K, training=training)
            u = self._quant("u", u, training)
            K[:, 0] += D  # the skip D*u is the kernel's lag-0 tap
            conv, u_f_conj, K_f = causal_conv(u, K)
            y = np.ascontiguousarray(conv)
            self._cache = (mode, ctx, u.shape, Abar, Bbar, C, Ct, u_f_conj, K_f)
        elif self.q["x"] is None and self.state_clip is None:
            y = scan(u, Abar, Bbar, C, D)
            self._cache = (mode, ctx, u.shape, Abar, Bbar, C, D, u)
        else:
            state = StateQuant(None) if self.q["x"] is None else self._state_quant(u, Abar, Bbar, training)
            clip = np.inf if self.state_clip is None else self.state_clip
            y, scan_cache = quant_scan(u, Abar, Bbar, C, D, state, clip)
            self._cache = (mode, ctx, u.shape, scan_cache)
        return y

    def _core_backward(self, g: np.ndarray) -> np.ndarray:
        mode, ctx, shape, *saved = self._saved()
        if mode == "conv":
            Abar, Bbar, C, Ct, u_f_conj, K_f = saved
            conv, dK = causal_conv_backward(g, u_f_conj, K_f)
            du = self._unquant("u", np.ascontiguousarray(conv))
            g_D = dK[:, 0]
            g_K = self._unquant("K", dK)
            g_Ct, g_Abar = ssm_kernel_backward(g_K.astype(np.float64), Ct, Abar)
            g_C = np.conj(Bbar) * g_Ct
            g_Bbar = np.conj(C) * g_Ct
        elif len(saved) == 5:
            Abar, Bbar, C, D, u = saved
            du, g_Abar, g_Bbar, g_C = scan_backward(u, g, Abar, Bbar, C, D)
            g_D = np.einsum("bth,bth->h", g, u)
        else:
            (scan_cache,) = saved
            sg = quant_scan_backward(g, scan_cache)
            du, g_Abar, g_Bbar, g_C, g_D = sg["u"], sg["Abar"], sg["Bbar"], sg["C"], sg["D"]
            self._state_step_grad(sg["step"], scan_cache)
        grads = self._ssm_params_backward(mode, ctx, g_Abar, g_Bbar, g_C, g_D)
        self._grads = {name: grads[name].astype(value.dtype) for name, value in self._params.items()}
        # The other mode's learned steps did not act on this output: their gradient is zero (the
        # optimizer needs an entry for every parameter, and a stale one must not be reapplied).
        for key in ("x",) if mode == "conv" else ("K", "u"):
            q = self.q[key]
            if q is not None and q.scale_mode == "learned":
                q._grads["step"] = np.zeros_like(q._params["step"])
        return du

    def _state_step_grad(self, dstep: np.ndarray, scan_cache) -> None:
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
            count = 2 * scan_cache.u.size * (self.d_state // 2) / q.n_scales  # state entries per scale
            g = 1.0 / np.sqrt(count * q.spec.code_grid.qpos)
        q._grads["step"] = (flat * g).astype(q.dtype)

    def _post_ops(self) -> list[Module]:
        return [op for op in (self.activation, self.dropout, self.mixing) if op is not None]

    def forward(self, u: np.ndarray, training: bool = False, mode: str = "conv") -> np.ndarray:
        """u (batch, length, d_model) -> (batch, length, d_model); checks u (shape, finite values)."""
        check_choice("mode", mode, MODES)
        return self._forward(check_sequence_input("u", u, self.d_model), training, mode)

    def _forward(self, u: np.ndarray, training: bool, mode: str) -> np.ndarray:
        """``forward`` without the input checks (the model checks its own input once)."""
        u = np.ascontiguousarray(u, dtype=self.dtype)
        y = self._core_forward(u, training, mode)
        for op in self._post_ops():
            if op is self.mixing and self.weight_quant is not None:
                with self.weight_quant.forward(training):
                    y = op.forward(y, training=training)
            else:
                y = op.forward(y, training=training)
        return self._quant("act", y, training)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        """dL/dy (batch, length, d_model) -> dL/du; fills ``grads`` for the mode that ran forward."""
        shape = self._saved()[2]
        return self._backward(check_grad_like("grad", grad, shape))

    def _backward(self, grad: np.ndarray) -> np.ndarray:
        """``backward`` without the gradient checks."""
        g = self._unquant("act", grad.astype(self.dtype, copy=False))
        for op in reversed(self._post_ops()):
            if op is self.mixing and self.weight_quant is not None:
                with self.weight_quant.backward():
                    g = op.backward(g)
            else:
                g = op.backward(g)
        return self._core_backward(np.asarray(g, dtype=self.dtype))

    # -- streaming ----------------------------------------------------------
    def initial_state(self, batch: int) -> np.ndarray:
        """Zero state (batch, d_model, d_state/2) complex."""
        batch = check_int("batch", batch, min_value=1)
        return np.zeros((batch, self.d_model, self.d_state // 2), dtype=self.cdtype)

    def step(self, u_t: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One time step for inference: u_t (batch, d_model), state from ``initial_state``.

        Returns (y_t (batch, d_model), new state); applies activation and mixing
        (never dropout) and leaves the forward caches of ``forward`` untouched.
        """
        if self.quant is not None:
            raise ValueError("step() is the float recurrence; a quantized layer runs forward(..., mode='recurrent') "
                             "or, for the integer model, exports quantized_recurrent()")
        u_t = check_array("u_t", u_t, ndim=2)
        if u_t.shape[1] != self.d_model:
            raise ValueError(f"u_t must have shape (batch, {self.d_model}), got {u_t.shape}")
        M = self.d_state // 2
        state = check_array("state", state, shape=(u_t.shape[0], self.d_model, M), allow_complex=True)
        d = self.discrete()
        u_t = u_t.astype(self.dtype, copy=False)
        x = (d.Abar.astype(self.cdtype) * state + d.Bbar.astype(self.cdtype) * u_t[:, :, None]).astype(self.cdtype)
        y = 2 * np.einsum("hm,bhm->bh", self._params["C"], x).real + self._params["D"] * u_t
        y = y.astype(self.dtype, copy=False)
        for op in (self.activation, self.mixing):
            if op is not None:
                y = _inference(op, y)
        return y, x
