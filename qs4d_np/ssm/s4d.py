"""The S4D layer: diagonal SSM (convolution or recurrent mode) -> activation -> dropout -> mixing.

Block order as in the state-spaces S4D example: y = SSM(u) + D*u, then
activation (GELU by default), channel dropout, pointwise H -> 2H + GLU. The
residual connection and the norm belong to the model's block, not here.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from qs4d_np.core.activations import GELU, ReLU
from qs4d_np.core.checks import (check_array, check_choice, check_float, check_grad_like, check_int,
                                 check_sequence_input)
from qs4d_np.core.dropout import Dropout
from qs4d_np.core.mixing import PointwiseGLU
from qs4d_np.core.module import Module, kept_caches
from qs4d_np.kernels.scan import scan, scan_backward
from qs4d_np.quant.config import QuantConfig
from qs4d_np.quant.discrete import polar_abar, polar_params
from qs4d_np.quant.quantizer import Quantizer
from qs4d_np.quant.scan import quant_scan, quant_scan_backward
from qs4d_np.ssm.discretize import DISCRETIZATIONS, DiscreteSSM, discretize
from qs4d_np.ssm.fftconv import causal_conv, causal_conv_backward
from qs4d_np.ssm.kernel import ssm_kernel, ssm_kernel_backward
from qs4d_np.ssm.quantized import EffectiveSSM, S4DQuant

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

    Quantization (``quant``, a ``QuantConfig``; ``layer`` picks per-layer levels):
    ``qs4d_np.ssm.quantized`` (``S4DQuant``, the ``quantization`` attribute) builds a
    ``Quantizer`` child per quantized target (``quant_A``, ``quant_Abar``, ``quant_B``,
    ``quant_C``, ``quant_D``, ``quant_dt``, ``quant_K``, ``quant_u``, ``quant_x``,
    ``quant_linear``, ``quant_act``; ``q[key]`` maps the keys to them or None) and
    applies them; its docstring has the table of where each acts in either mode.
    Recurrent mode with a ``state`` target or a ``state_clip`` runs
    ``qs4d_np.quant.quant_scan``; ``state_clip`` bounds |Re x|, |Im x| at every step
    before quantizing (None: no clip beyond the quantizer's saturation); without
    either, recurrent mode runs the float scan with the quantized parameters.

    Inspection and streaming: ``effective_ssm(mode)`` (the Abar, Bbar, C, D an
    evaluation forward computes with), ``mixing_weight()``, ``act_quantizer``,
    ``quantized_recurrent(calib)`` (codes and scales for the integer model) and
    ``step(u_t, state)`` (one time step, float or quantized; derives the parameters per call) and
    ``stepper()`` (the same with every per-stream constant frozen once: the fast path).
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
        self.quantization = S4DQuant(self)  # registers the quantizer children

    # -- quantization ---------------------------------------------------------
    @property
    def q(self) -> dict[str, Quantizer | None]:
        """The quantizer of each key (``qs4d_np.ssm.quantized.KEYS``) or None where float."""
        return self.quantization.q

    @property
    def act_quantizer(self) -> Quantizer | None:
        """The quantizer of the layer output (``act`` target; axis 2 of (batch, length, H)) or None."""
        return self.quantization.q["act"]

    def init_param_steps(self) -> None:
        """(Re)initialise the learned steps of the parameter targets (A, Abar, B, C, D, dt) from the
        current parameters (LSQ init). Runs at construction, so no uninitialised step is left for a target
        the training mode never reaches; ``quant.with_quant`` runs it again after copying weights."""
        self.quantization.init_param_steps()

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

    def effective_ssm(self, mode: str = "recurrent") -> EffectiveSSM:
        """The SSM parameters an evaluation-mode ``forward(u, mode=mode)`` computes with.

        ``Abar``, ``Bbar``, ``C`` (H, M) complex128 and ``D`` (H,) float64: the fake-quant values
        where the config quantizes them in ``mode``, float otherwise; ``Abar_float``,
        ``Bbar_float`` (H, M) complex128: the values before the Abar / Bbar quantizers. In
        ``conv`` mode Abar comes from the quantized A (if any) and B, D are not quantized; the
        kernel and input quantizers (K, u) act on data, not here. Forward caches are kept.
        """
        check_choice("mode", mode, MODES)
        return self.quantization.effective(mode)

    def mixing_weight(self) -> np.ndarray | None:
        """The mixing weight (H, 2H) an evaluation forward computes with (quantized when the ``linear``
        target is; a copy either way), in the layer's dtype; None without mixing. Caches are kept."""
        if self.mixing is None:
            return None
        W = self.mixing.linear._params["weight"]
        wq = self.quantization.weight_quant
        if wq is None:
            return W.copy()
        with self.quantization.kept_caches():
            return wq.quantizer.forward(W, training=False)

    def quantized_recurrent(self, calib: np.ndarray | None = None) -> dict[str, Any]:
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
        * ``act``: the output quantizer's scales {"inv_scale" (in the layer's dtype, as the
          forward quantizes with it), "zero_point" (int64; per tensor: (1,), per channel:
          (H,)), "grid", "rounding"} or None. The layer's input is the previous layer's (or
          the encoder's) output; recurrent mode does not quantize it again here.

        Data-dependent (``absmax``) state / act ranges change with every batch: ``calib``
        (batch, L, d_model), an input to the layer, resolves them as ``forward(calib,
        mode="recurrent")`` would (the state's from the float states on calib, the act's from
        the layer's output on calib); without it they raise. Static ranges (``fixed``,
        calibrated ``running``, initialised ``learned``) ignore calib. Leaves the forward
        caches untouched.
        """
        if self.quant is None:
            raise ValueError("quantized_recurrent() needs a layer built with quant=QuantConfig(...)")
        return self.quantization.export(calib)

    def _core_forward(self, u: np.ndarray, training: bool, mode: str) -> np.ndarray:
        qz = self.quantization
        Abar, Bbar, C, D, ctx = qz.ssm_params(training, mode)
        if mode == "conv":
            Ct = C * Bbar
            K = ssm_kernel(Ct, Abar, u.shape[1])
            if self.q["K"] is not None:
                K = self.q["K"].forward(K, training=training)
            u = qz.apply("u", u, training)
            K[:, 0] += D  # the skip D*u is the kernel's lag-0 tap
            conv, u_f_conj, K_f = causal_conv(u, K)
            y = np.ascontiguousarray(conv)
            self._cache = (mode, ctx, u.shape, Abar, Bbar, C, Ct, u_f_conj, K_f)
        elif not qz.runs_quant_scan:
            y = scan(u, Abar, Bbar, C, D)
            self._cache = (mode, ctx, u.shape, Abar, Bbar, C, D, u)
        else:
            state = qz.state_quant(u, Abar, Bbar, training)
            clip = np.inf if self.state_clip is None else self.state_clip
            y, scan_cache = quant_scan(u, Abar, Bbar, C, D, state, clip)
            self._cache = (mode, ctx, u.shape, scan_cache)
        return y

    def _core_backward(self, g: np.ndarray) -> np.ndarray:
        mode, ctx, shape, *saved = self._saved()
        qz = self.quantization
        if mode == "conv":
            Abar, Bbar, C, Ct, u_f_conj, K_f = saved
            conv, dK = causal_conv_backward(g, u_f_conj, K_f)
            du = qz.unapply("u", np.ascontiguousarray(conv))
            g_D = dK[:, 0]
            g_K = qz.unapply("K", dK)
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
            qz.state_step_grad(sg["step"], scan_cache)
        grads = qz.ssm_params_backward(mode, ctx, g_Abar, g_Bbar, g_C, g_D)
        self._grads = {name: grads[name].astype(value.dtype) for name, value in self._params.items()}
        qz.zero_unused_steps(mode)
        return du

    def _post_ops(self) -> list[Module]:
        return [op for op in (self.activation, self.dropout, self.mixing) if op is not None]

    def forward(self, u: np.ndarray, training: bool = False, mode: str = "conv") -> np.ndarray:
        """u (batch, length, d_model) -> (batch, length, d_model); checks u (shape, finite values)."""
        check_choice("mode", mode, MODES)
        return self._forward(check_sequence_input("u", u, self.d_model), training, mode)

    def _forward(self, u: np.ndarray, training: bool, mode: str) -> np.ndarray:
        """``forward`` without the input checks (the model checks its own input once)."""
        return self._post(self._core_forward(np.ascontiguousarray(u, dtype=self.dtype), training, mode), training)

    def _post(self, y: np.ndarray, training: bool) -> np.ndarray:
        """The core output y (batch, length, H) through activation, dropout, mixing and the act quantizer."""
        return self.quantization.apply("act", self._post_ops_forward(y, training), training)

    def _post_ops_forward(self, y: np.ndarray, training: bool) -> np.ndarray:
        wq = self.quantization.weight_quant
        for op in self._post_ops():
            if op is self.mixing and wq is not None:
                with wq.forward(training):
                    y = op.forward(y, training=training)
            else:
                y = op.forward(y, training=training)
        return y

    def _pre_act(self, u: np.ndarray, training: bool, mode: str) -> np.ndarray:
        """The layer output on u (batch, length, H) before the act quantizer (its range source)."""
        return self._post_ops_forward(self._core_forward(u, training, mode), training)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        """dL/dy (batch, length, d_model) -> dL/du; fills ``grads`` for the mode that ran forward."""
        shape = self._saved()[2]
        return self._backward(check_grad_like("grad", grad, shape))

    def _backward(self, grad: np.ndarray) -> np.ndarray:
        """``backward`` without the gradient checks."""
        g = self.quantization.unapply("act", grad.astype(self.dtype, copy=False))
        wq = self.quantization.weight_quant
        for op in reversed(self._post_ops()):
            if op is self.mixing and wq is not None:
                with wq.backward():
                    g = op.backward(g)
            else:
                g = op.backward(g)
        return self._core_backward(np.asarray(g, dtype=self.dtype))

    # -- streaming ----------------------------------------------------------
    def initial_state(self, batch: int) -> np.ndarray:
        """Zero state (batch, d_model, d_state/2) complex."""
        return zero_state(batch, self.d_model, self.d_state, self.dtype)

    def stepper(self) -> "S4DStepper":
        """This layer in evaluation, frozen for streaming (``S4DStepper``): every per-stream constant
        is derived once here, so each ``stepper.step(u_t, state)`` costs only the step's arithmetic."""
        return S4DStepper(self, "stepper()")

    def step(self, u_t: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One time step for inference: u_t (batch, d_model), state (batch, d_model, d_state/2) complex
        from ``initial_state`` or the previous step.

        Returns (y_t (batch, d_model), new state); applies activation and mixing (never
        dropout) and leaves the forward caches of ``forward`` untouched.

        A quantized layer steps ``forward(u, mode="recurrent")`` in evaluation: the quantized
        Abar, Bbar, C, D, the state clip, the state quantizer, the mixing with its quantized
        weight and the act quantizer, in the recurrent kernel's arithmetic
        (``S4DQuant.frozen_core``); the state returned is the quantized state. The state and act
        ranges must be static (``fixed``, calibrated ``running``, initialised ``learned``): an
        ``absmax`` range comes from the whole sequence and is refused. The conv-mode-only
        quantizers (K, u) take no part.

        Each call derives the (quantized) parameters anew (a ``stepper()`` per call); to stream
        many steps, build ``stepper()`` once and step it.
        """
        u_t, state = check_step(u_t, state, self.d_model, self.d_state, self.dtype)
        y, x = S4DStepper(self, "step()", track=False)._step(u_t, state.transpose(2, 0, 1))
        return y, np.ascontiguousarray(x.transpose(1, 2, 0))


def zero_state(batch: int, d_model: int, d_state: int, dtype: np.dtype, mode_major: bool = False) -> np.ndarray:
    """The zero SSM state (batch, d_model, d_state/2) in ``dtype``'s complex dtype; ``mode_major``:
    (d_state/2, batch, d_model), the layout of ``S4DStepper``."""
    batch = check_int("batch", batch, min_value=1)
    shape = (d_state // 2, batch, d_model) if mode_major else (batch, d_model, d_state // 2)
    return np.zeros(shape, dtype=np.result_type(dtype, np.complex64))


def check_step(u_t: object, state: object, d_model: int, d_state: int, dtype: np.dtype,
               name: str = "u_t", mode_major: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Check one step's input ``name`` (batch, d_model) (finite) and state (batch, d_model,
    d_state/2), or (d_state/2, batch, d_model) when ``mode_major`` (complex or real, finite);
    return them in ``dtype`` and its complex dtype."""
    u_t = check_array(name, u_t, ndim=2)
    if u_t.shape[1] != d_model:
        raise ValueError(f"{name} must have shape (batch, {d_model}), got {u_t.shape}")
    B, M = u_t.shape[0], d_state // 2
    state = check_array("state", state, shape=(M, B, d_model) if mode_major else (B, d_model, M),
                        allow_complex=True)
    cdtype = np.result_type(dtype, np.complex64)
    return u_t.astype(dtype, copy=False), state.astype(cdtype, copy=False)


def snapshot(op: Module) -> Module:
    """A deep copy of ``op`` and its children without their forward caches: its parameters and
    buffers as they are now, for a stream to run evaluation forwards on (never a backward)."""
    with kept_caches(op):
        for _, m in op.modules():
            m._cache = None  # a pending training cache can be large; the copy needs none
        return copy.deepcopy(op)


def _arrays(module: Module) -> dict[str, np.ndarray]:
    """Every parameter and buffer of ``module`` and its descendants (shared arrays)."""
    return {f"{prefix}:{kind}:{key}": value for prefix, m in module.modules()
            for kind, arrays in (("param", m._params), ("buffer", getattr(m, "buffers", {})))
            for key, value in arrays.items()}


class ParamSnapshot:
    """Copies of a module's parameters and buffers (quantizer ranges included) taken when a stream
    is built; ``is_current()`` tells whether the module still holds exactly those values.
    ``track=False`` copies nothing (a stepper inside a stream, or built for a single step)."""

    def __init__(self, module: Module, track: bool = True) -> None:
        self.module = module
        self.arrays = {key: value.copy() for key, value in _arrays(module).items()} if track else None

    def is_current(self) -> bool:
        if self.arrays is None:
            raise RuntimeError(f"this {type(self.module).__name__} stepper was built without a snapshot (it is "
                               "part of a stream, or was built for one step): ask the stream's is_current()")
        now = _arrays(self.module)
        return now.keys() == self.arrays.keys() and all(
            now[key].shape == value.shape and np.array_equal(now[key], value)
            for key, value in self.arrays.items())


class S4DStepper:
    """One S4D layer in evaluation, frozen for streaming one time step at a time (``S4D.stepper()``).

    Built once, it holds every per-stream constant, derived from the layer at creation: the
    core's (quantized) Abar, Bbar, C, D, state clip and state scales (``CoreStep``), copies of the
    activation and of the mixing with its (quantized) weight, and the act quantizer's static
    scales. ``step(u_t, state)`` then does the arithmetic only, with ``S4D.step``'s contract and
    results, except that its state is **mode-major**, (d_state/2, batch, d_model) complex, so
    that every elementwise pass and each mode's read-out add run over contiguous memory
    (``x.transpose(1, 2, 0)`` is ``S4D.step``'s state). It is a snapshot: parameters, buffers or quantizer ranges changed in
    the layer afterwards do not reach it (``is_current()`` says whether they changed; build a new
    stepper). ``where`` names the caller in the error for a data-dependent (absmax) range;
    ``track=False`` skips the snapshot behind ``is_current`` (inside a stream, one-step use).
    """

    def __init__(self, layer: S4D, where: str = "S4DStepper", track: bool = True) -> None:
        self.d_model, self.d_state, self.dtype = layer.d_model, layer.d_state, layer.dtype
        self.core = layer.quantization.frozen_core(where)
        self.act = layer.quantization.frozen_act()
        self._post: list[Module] = [snapshot(op) for op in (layer.activation, layer.mixing) if op is not None]
        if layer.mixing is not None:
            self._post[-1].linear._params["weight"] = layer.mixing_weight()  # quantized when 'linear' is
        self._snapshot = ParamSnapshot(layer, track)

    @property
    def post_ops(self) -> tuple[Module, ...]:
        """The frozen copies the step applies after the core, in order: the activation and the
        mixing (its weight quantized where the layer quantizes it), those the layer has."""
        return tuple(self._post)

    def initial_state(self, batch: int) -> np.ndarray:
        """Zero state (d_state/2, batch, d_model) complex (mode-major)."""
        return zero_state(batch, self.d_model, self.d_state, self.dtype, mode_major=True)

    def is_current(self) -> bool:
        """Whether the layer's parameters and buffers are still those this stepper was built from."""
        return self._snapshot.is_current()

    def step(self, u_t: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """u_t (batch, d_model), state (d_state/2, batch, d_model) -> (y_t (batch, d_model), new state)."""
        return self._step(*check_step(u_t, state, self.d_model, self.d_state, self.dtype, mode_major=True))

    def _step(self, u_t: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``step`` on checked input in the layer's dtype and complex dtype (the model checks its input once)."""
        y, x = self.core.step(u_t, state)
        for op in self._post:
            y = op.forward(y)
        if self.act is not None:
            y = self.act.apply(y)
        return y, x
