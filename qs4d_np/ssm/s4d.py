"""The S4D layer: SSM core -> activation -> dropout -> mixing -> act quantizer.

Block order as in the state-spaces S4D example: y = SSM(u) + D*u (``S4DCore``), then
activation (GELU by default), channel dropout, pointwise H -> 2H + GLU, then the
quantizer of the layer output (``act`` target). The residual connection and the
norm belong to the model's block, not here.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import numpy as np

from qs4d_np.core.activations import GELU, ReLU
from qs4d_np.core.checks import check_bool, check_choice, check_float, check_grad_like, check_sequence_input
from qs4d_np.core.dropout import Dropout
from qs4d_np.core.mixing import PointwiseGLU
from qs4d_np.core.module import Module
from qs4d_np.core.snapshot import ParamSnapshot, snapshot
from qs4d_np.quant.config import QuantConfig
from qs4d_np.quant.frozen import FrozenQuant
from qs4d_np.quant.quantizer import Quantizer
from qs4d_np.quant.weights import WeightQuant
from qs4d_np.ssm.core import ABARS, INITS, MODES, STATIC_SCALE_MODES, S4DCore, init_A
from qs4d_np.ssm.discretize import DiscreteSSM
from qs4d_np.ssm.export import ActScales, RecurrentExport
from qs4d_np.ssm.params import SSMParams
from qs4d_np.ssm.stream import check_step, zero_state

__all__ = ["ABARS", "ACTIVATIONS", "INITS", "MIXINGS", "MODES", "EffectiveSSM", "S4D", "S4DStepper", "init_A"]

ACTIVATIONS = {"gelu": GELU, "relu": ReLU, None: None}
MIXINGS = ("glu", None)
# The parameters an evaluation forward computes with (``S4D.effective_ssm``); the former name.
EffectiveSSM = SSMParams


def _core_setting(name: str) -> property:
    """A read-only view of the core's setting ``name`` (one source of truth: the core uses it)."""
    return property(lambda self: getattr(self.core, name), doc=f"The core's ``{name}`` (read-only).")


class S4D(Module):
    """S4D layer on (batch, length, d_model) inputs, optionally quantization-aware.

    Children: ``core`` (``S4DCore``, registered inline: its parameters keep the layer's
    names, ``C``, ``log_dt``, ``quant_C.step``, ...), ``activation``, ``dropout`` and ``mixing``
    when enabled, and the quantizers of the mixing weight (``quant_linear``) and of the output
    (``quant_act``). The core's docstring lists the SSM parameters per ``abar`` and where each
    quantizer acts; ``q[key]`` maps every key (``A``, ``Abar``, ``B``, ``C``, ``D``, ``dt``, ``K``,
    ``u``, ``x``, ``linear``, ``act``) to its quantizer or None.

    ``forward(u, training, mode)`` runs the SSM as an FFT convolution (``mode="conv"``) or as
    the recurrence (``"recurrent"``); without quantization both give the same outputs and
    parameter gradients up to rounding.

    Inspection and streaming: ``effective_ssm(mode)``, ``mixing_weight()``, ``act_quantizer``,
    ``quantized_recurrent(calib)`` (codes and scales for the integer model), ``step(u_t, state)``
    (one time step, deriving the parameters per call) and ``stepper()`` (every per-stream
    constant frozen once: the fast path).
    """

    def __init__(self, d_model: int, d_state: int = 64, *, init: str = "lin", disc: str = "zoh",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, activation: str | None = "gelu",
                 mixing: str | None = "glu", dropout: float = 0.0, learn_B: bool = False,
                 dtype: type = np.float32, seed: int | np.random.Generator | None = None,
                 quant: QuantConfig | None = None, layer: int | None = None, abar: str = "continuous",
                 state_clip: float | None = None) -> None:
        super().__init__()
        check_choice("activation", activation, tuple(ACTIVATIONS))
        check_choice("mixing", mixing, MIXINGS)
        dropout = check_float("dropout", dropout, min_value=0.0, max_value=1.0, max_inclusive=False)
        rng = np.random.default_rng(seed)
        self.core = self.add_child("core", S4DCore(
            d_model, d_state, init=init, disc=disc, dt_min=dt_min, dt_max=dt_max, learn_B=learn_B, dtype=dtype,
            seed=rng, quant=quant, layer=layer, abar=abar, state_clip=state_clip), inline=True)
        H = self.d_model
        dropout_rng, mixing_rng = rng.spawn(2)
        self.activation = None if activation is None else self.add_child("activation", ACTIVATIONS[activation]())
        self.dropout = self.add_child("dropout", Dropout(dropout, seed=dropout_rng)) if dropout > 0 else None
        self.mixing = (self.add_child("mixing", PointwiseGLU(H, dtype=self.dtype, seed=mixing_rng))
                       if mixing == "glu" else None)
        self.weight_quant: WeightQuant | None = None
        self._act: Quantizer | None = None
        if quant is not None:
            if self.mixing is not None:
                q = self._quantizer(quant, "linear", axis=1, channels=2 * H)
                if q is not None:
                    self.weight_quant = WeightQuant(self.mixing.linear, self.add_child("quant_linear", q))
            self._act = self._quantizer(quant, "act", axis=2, channels=H)
            if self._act is not None:
                self.add_child("quant_act", self._act)

    d_model, d_state, dtype, cdtype = (_core_setting(n) for n in ("d_model", "d_state", "dtype", "cdtype"))
    disc, init, abar, quant, layer, state_clip = (
        _core_setting(n) for n in ("disc", "init", "abar", "quant", "layer", "state_clip"))

    def _quantizer(self, cfg: QuantConfig, target: str, axis: int, channels: int) -> Quantizer | None:
        n = channels if cfg.target(target).per_channel else 1
        return cfg.quantizer_for(target, self.layer, axis=axis, n_scales=n, dtype=self.dtype)

    # -- quantization ---------------------------------------------------------
    @property
    def q(self) -> dict[str, Quantizer | None]:
        """The quantizer of each key (the core's and ``linear``, ``act``) or None where float."""
        linear = None if self.weight_quant is None else self.weight_quant.quantizer
        return {**self.core.q, "linear": linear, "act": self._act}

    @property
    def act_quantizer(self) -> Quantizer | None:
        """The quantizer of the layer output (``act`` target; axis 2 of (batch, length, H)) or None."""
        return self._act

    def init_param_steps(self) -> None:
        """(Re)initialise the learned steps of the parameter targets from the current parameters
        (``S4DCore.init_param_steps``)."""
        self.core.init_param_steps()

    def data_range_quantizer(self) -> str | None:
        """Names the first state / act quantizer whose range comes from the data it quantizes, if any."""
        found = self.core.data_range_quantizer()
        if found is None and self._act is not None and self._act.scale_mode not in STATIC_SCALE_MODES:
            found = f"quantizer {self._act.name!r} (target 'act', scale_mode={self._act.scale_mode!r})"
        return found

    # -- the SSM core's parameters ------------------------------------------------------
    def set_discrete(self, Abar: np.ndarray, Bbar: np.ndarray) -> None:
        """Set Abar and Bbar (H, M) complex of a ``discrete`` or ``frozen`` layer (e.g. from a float model)."""
        self.core.set_discrete(Abar, Bbar)

    def discrete(self) -> DiscreteSSM:
        """The current float (Abar, Bbar) and intermediates (``S4DCore.discrete``)."""
        return self.core.discrete()

    def kernel(self, L: int) -> np.ndarray:
        """The float convolution kernel K (H, L) in the layer's dtype."""
        return self.core.kernel(L)

    def effective_ssm(self, mode: str = "recurrent") -> SSMParams:
        """The SSM parameters an evaluation-mode ``forward(u, mode=mode)`` computes with
        (``S4DCore.effective``); forward caches are kept."""
        return self.core.effective(mode)

    def mixing_weight(self) -> np.ndarray | None:
        """The mixing weight (H, 2H) an evaluation forward computes with (quantized when the ``linear``
        target is; a copy either way), in the layer's dtype; None without mixing. Caches are kept."""
        if self.mixing is None:
            return None
        W = self.mixing.linear.params["weight"]
        if self.weight_quant is None:
            return W.copy()
        return self.weight_quant.evaluate()

    def quantized_recurrent(self, calib: np.ndarray | None = None) -> RecurrentExport:
        """The quantized tensors the evaluation-mode recurrent forward uses, for the integer golden model
        (a ``RecurrentExport``; ``ex.Abar`` or ``ex["Abar"]``).

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
        * ``act``: the output quantizer's scales (``ActScales``: inv_scale in the layer's dtype,
          as the forward quantizes with it, zero_point int64, per tensor (1,) or per channel
          (H,), grid, rounding) or None. The layer's input is the previous layer's (or
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
        found = self.data_range_quantizer()
        if calib is None and found is not None:
            raise ValueError(f"quantized_recurrent(): {found} takes its range from each tensor it quantizes; "
                             f"pass calib (batch, L, {self.d_model}) to resolve it on that input as the forward "
                             f"would, or calibrate static ranges (scale_mode 'running' with "
                             f"qs4d_np.train.ptq.calibrate, 'fixed' or 'learned')")
        if calib is not None:
            calib = np.ascontiguousarray(check_sequence_input("calib", calib, self.d_model), dtype=self.dtype)
        core = self.core.export(calib)
        linear = bias = None
        if self.mixing is not None:
            weights = self.mixing.linear.params
            linear = weights["weight"] if self.weight_quant is None else \
                self.weight_quant.quantizer.quantize(weights["weight"])
            bias = weights["bias"]
        act, scales = self._act, None
        if act is not None:
            if act.scale_mode in STATIC_SCALE_MODES:
                inv, zp = act.static_scales(self.dtype)
            else:  # the range of the layer's output on calib, as the forward quantizes it
                with self.kept_caches():
                    t = act.quantize(self._post_ops_forward(self.core.forward(calib, False, "recurrent",
                                                                              checked=True), False))
                # (1, 1, n) -> (n,); the forward's inv is in the layer's dtype (the float64 copy is exact)
                inv, zp = t.inv_scale.reshape(-1).astype(self.dtype), t.zero_point.reshape(-1)
            scales = ActScales(inv, zp.astype(np.int64), act.spec.code_grid, act.spec.rounding)
        return RecurrentExport(**core, linear=linear, linear_bias=bias, act=scales)

    @contextmanager
    def kept_caches(self) -> Iterator[None]:
        """Run inference inside without disturbing a pending backward: on exit every forward cache of
        the layer, its children and the quantized mixing weight is what it was."""
        with super().kept_caches(), (nullcontext() if self.weight_quant is None else self.weight_quant.kept()):
            yield

    # -- forward / backward ----------------------------------------------------------
    def _post_ops(self) -> list[Module]:
        return [op for op in (self.activation, self.dropout, self.mixing) if op is not None]

    def _post_ops_forward(self, y: np.ndarray, training: bool) -> np.ndarray:
        for op in self._post_ops():
            if op is self.mixing and self.weight_quant is not None:
                with self.weight_quant.forward(training):
                    y = op.forward(y, training=training)
            else:
                y = op.forward(y, training=training)
        return y

    def forward(self, u: np.ndarray, training: bool = False, mode: str = "conv", *,
                checked: bool = False) -> np.ndarray:
        """u (batch, length, d_model) -> (batch, length, d_model); checks u (shape, finite values)
        unless ``checked`` (the model checks its input once)."""
        training = check_bool("training", training)
        if not checked:
            check_choice("mode", mode, MODES)
            u = check_sequence_input("u", u, self.d_model)
        u = np.ascontiguousarray(u, dtype=self.dtype)
        y = self._post_ops_forward(self.core.forward(u, training, mode, checked=True), training)
        if self._act is not None:
            y = self._act.forward(y, training=training)
        self._cache = y.shape
        return y

    def backward(self, grad: np.ndarray, *, checked: bool = False) -> np.ndarray:
        """dL/dy (batch, length, d_model) -> dL/du; fills ``grads`` for the mode that ran forward.
        Checks grad against the forward's output unless ``checked``."""
        shape = self._saved()
        g = grad if checked else check_grad_like("grad", grad, shape)
        g = g.astype(self.dtype, copy=False)
        if self._act is not None:
            g = self._act.backward(g)
        for op in reversed(self._post_ops()):
            if op is self.mixing and self.weight_quant is not None:
                with self.weight_quant.backward():
                    g = op.backward(g)
            else:
                g = op.backward(g)
        return self.core.backward(np.asarray(g, dtype=self.dtype), checked=True)

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
        weight and the act quantizer, in the recurrent kernel's arithmetic (``S4DCore.frozen``);
        the state returned is the quantized state. The state and act ranges must be static
        (``fixed``, calibrated ``running``, initialised ``learned``): an ``absmax`` range comes
        from the whole sequence and is refused. The conv-mode-only quantizers (K, u) take no part.

        Each call derives the (quantized) parameters anew (a ``stepper()`` per call); to stream
        many steps, build ``stepper()`` once and step it.
        """
        u_t, state = check_step(u_t, state, self.d_model, self.d_state, self.dtype)
        y, x = S4DStepper(self, "step()", track=False).step(u_t, state.transpose(2, 0, 1), checked=True)
        return y, np.ascontiguousarray(x.transpose(1, 2, 0))


class S4DStepper:
    """One S4D layer in evaluation, frozen for streaming one time step at a time (``S4D.stepper()``).

    Built once, it holds every per-stream constant, derived from the layer at creation: the
    core's (quantized) Abar, Bbar, C, D, state clip and state scales (``CoreStep``), copies of the
    activation and of the mixing with its (quantized) weight, and the act quantizer's static
    scales. ``step(u_t, state)`` then does the arithmetic only, with ``S4D.step``'s contract and
    results, except that its state is **mode-major**, (d_state/2, batch, d_model) complex, so
    that every elementwise pass and each mode's read-out add run over contiguous memory
    (``x.transpose(1, 2, 0)`` is ``S4D.step``'s state). It is a snapshot: parameters, buffers or
    quantizer ranges changed in the layer afterwards do not reach it (``is_current()`` says
    whether they changed; build a new stepper). ``where`` names the caller in the error for a
    data-dependent (absmax) range; ``track=False`` skips the snapshot behind ``is_current``
    (inside a stream, one-step use).
    """

    def __init__(self, layer: S4D, where: str = "S4DStepper", track: bool = True) -> None:
        self.d_model, self.d_state, self.dtype = layer.d_model, layer.d_state, layer.dtype
        found = layer.data_range_quantizer()
        if found is not None:
            raise ValueError(f"{where}: {found} takes its range from the whole sequence it quantizes, which a "
                             f"stream does not have; calibrate static ranges (scale_mode 'running' with "
                             f"qs4d_np.train.ptq.calibrate) or use 'fixed' or 'learned'")
        self.core = layer.core.frozen()
        act = layer.act_quantizer
        self.act: FrozenQuant | None = None if act is None else act.frozen(self.dtype)
        self._post: list[Module] = [snapshot(op) for op in (layer.activation, layer.mixing) if op is not None]
        if layer.mixing is not None:
            # the copy's own weight array, overwritten in place with the weight the forward uses
            self._post[-1].linear.params["weight"][...] = layer.mixing_weight()
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

    def step(self, u_t: np.ndarray, state: np.ndarray, *, checked: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """u_t (batch, d_model), state (d_state/2, batch, d_model) -> (y_t (batch, d_model), new state).
        ``checked``: the caller has checked both and cast them to the layer's dtype and complex dtype."""
        if not checked:
            u_t, state = check_step(u_t, state, self.d_model, self.d_state, self.dtype, mode_major=True)
        y, x = self.core.step(u_t, state)
        for op in self._post:
            y = op.forward(y)
        if self.act is not None:
            y = self.act.apply(y)
        return y, x
