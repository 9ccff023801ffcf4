"""S4DModel: encoder -> n residual S4D blocks -> pooling over time -> decoder, with presets and files."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qs4d_np.core.checks import check_array, check_bool, check_choice, check_int, check_sequence_input
from qs4d_np.core.linear import Linear
from qs4d_np.core.module import Module, kept_caches
from qs4d_np.core.pooling import LastPool, MeanPool
from qs4d_np.io import atomic_save_npz, atomic_write_json, load_json, load_npz
from qs4d_np.models.block import BlockStepper, S4DBlock
from qs4d_np.models.stream_pack import PackedStream
from qs4d_np.quant.config import QuantConfig
from qs4d_np.quant.quantizer import Quantizer
from qs4d_np.quant.weights import WeightQuant
from qs4d_np.ssm.s4d import ABARS, MODES, ParamSnapshot, snapshot, zero_state

POOLS = {"mean": MeanPool, "last": LastPool}
FORMAT_VERSION = 1
# SSM parameters trained with lr min(0.001, lr) and no weight decay (state-spaces recipe).
SSM_PARAM_NAMES = ("log_dt", "log_A_real", "A_imag", "B", "Abar_rho", "Abar_theta", "Bbar")

PRESETS: dict[str, dict[str, Any]] = {
    # state-spaces example.py: GELU, GLU mixing, LayerNorm postnorm, residual, S4D-Lin.
    "s4d-example": dict(d_model=128, d_state=64, n_layers=4, dropout=0.1, norm="layer", prenorm=False,
                        residual=True, pool="mean", init="lin", activation="gelu", mixing="glu"),
    # QS4D reference: no activation, GLU mixing, BatchNorm postnorm, no residual, A_imag = pi*n/4.
    "qs4d": dict(d_model=128, d_state=64, n_layers=4, dropout=0.1, norm="batch", prenorm=False,
                 residual=False, pool="mean", init="qs4d", activation=None, mixing="glu"),
}


class S4DModel(Module):
    """Sequence classifier: x (batch, length, d_input) -> logits (batch, d_output).

    encoder Linear(d_input, d_model) (child ``encoder``) -> ``n_layers`` blocks
    (``S4DBlock``, children ``layers.0`` ... of the container ``layers``) ->
    mean or last over time -> decoder Linear(d_model, d_output) (child
    ``decoder``). Parameter names read ``layers.0.ssm.C``. ``**s4d_options``
    go to every S4D layer (init, disc, dt_min, dt_max, activation, mixing, learn_B,
    state_clip).

    Quantization-aware training: ``quant`` (a ``QuantConfig`` or None) goes to every
    S4D layer with ``layer=i`` (per-layer levels) and ``abar`` (``"continuous"``,
    ``"discrete"``, ``"frozen"``; see ``S4D``); the S4D layer quantizes its SSM
    targets, the mixing weight (``linear``) and its output after GLU (``act``); the
    model quantizes the encoder and decoder weights (``coder``; children
    ``quant_encoder``, ``quant_decoder``, biases float). ``config`` holds
    ``quant.to_dict()`` (or None) and ``abar``; ``save`` / ``load`` keep the
    quantizers' learned steps (parameters) and running ranges (buffers).

    ``mode`` ("conv" | "recurrent") is the default for ``forward``; both modes
    give the same outputs up to rounding. The input is checked once here
    (shape, finiteness); inner ops only check shapes.

    Streaming (one input sample per time step, a prediction after every step):
    ``stream()`` freezes the model in evaluation (``S4DModelStream``, the fast path: one
    fused kernel call per ``step``, or per ``run`` of many steps);
    ``step(x_t, state)`` with ``initial_state(batch)`` is the one-call form. The logits
    after step t are ``forward(x[:, :t+1], mode="recurrent")``'s to rounding.
    """

    def __init__(self, d_input: int, d_output: int, *, d_model: int = 128, d_state: int = 64,
                 n_layers: int = 4, dropout: float = 0.1, norm: str | None = "layer", prenorm: bool = False,
                 residual: bool = True, pool: str = "mean", mode: str = "conv", dtype: type = np.float32,
                 seed: int | None = None, quant: QuantConfig | None = None, abar: str = "continuous",
                 **s4d_options: Any) -> None:
        super().__init__()
        self.d_input = check_int("d_input", d_input, min_value=1)
        self.d_output = check_int("d_output", d_output, min_value=1)
        check_int("n_layers", n_layers, min_value=1)
        check_choice("pool", pool, tuple(POOLS))
        check_choice("mode", mode, MODES)
        if seed is not None:
            check_int("seed", seed, min_value=0)
        if quant is not None and not isinstance(quant, QuantConfig):
            raise TypeError(f"quant must be a QuantConfig or None, got {type(quant).__name__} "
                            "(QuantConfig.from_dict turns a saved dict back into one)")
        check_choice("abar", abar, ABARS)
        self.quant = quant
        self.mode = mode
        self.dtype = np.dtype(dtype)
        self.config: dict[str, Any] = dict(
            d_input=self.d_input, d_output=self.d_output, d_model=d_model, d_state=d_state, n_layers=n_layers,
            dropout=dropout, norm=norm, prenorm=bool(prenorm), residual=bool(residual), pool=pool, mode=mode,
            dtype=self.dtype.name, seed=seed, quant=None if quant is None else quant.to_dict(), abar=abar,
            **s4d_options)

        encoder_rng, decoder_rng, *layer_rngs = np.random.default_rng(seed).spawn(2 + n_layers)
        self.encoder = self.add_child("encoder", Linear(d_input, d_model, dtype=dtype, seed=encoder_rng))
        self.layers = self.add_child("layers", Module())
        self.blocks = [
            self.layers.add_child(str(i), S4DBlock(d_model, d_state=d_state, dropout=dropout, norm=norm,
                                                   prenorm=prenorm, residual=residual, dtype=dtype,
                                                   seed=layer_rngs[i], quant=quant, layer=i, abar=abar,
                                                   **s4d_options))
            for i in range(n_layers)
        ]
        self.pool = self.add_child("pool", POOLS[pool]())
        self.decoder = self.add_child("decoder", Linear(d_model, d_output, dtype=dtype, seed=decoder_rng))
        self.coder_quant: dict[str, WeightQuant] = {}
        if quant is not None:
            for name, linear in (("encoder", self.encoder), ("decoder", self.decoder)):
                per_channel = quant.options_for("coder")["per_channel"]
                q = quant.quantizer_for("coder", axis=1, n_scales=linear.d_out if per_channel else 1, dtype=dtype)
                if q is not None:
                    q.name = f"coder.{name}"
                    self.coder_quant[name] = WeightQuant(linear, self.add_child(f"quant_{name}", q))

    # -- presets ------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, d_input: int, d_output: int, **overrides: Any) -> "S4DModel":
        """Build a named preset ("s4d-example" or "qs4d"); keyword overrides win."""
        check_choice("preset", name, tuple(PRESETS))
        return cls(d_input, d_output, **{**PRESETS[name], **overrides})

    # -- forward / backward -------------------------------------------------
    def forward(self, x: np.ndarray, training: bool = False, mode: str | None = None) -> np.ndarray:
        """x (batch, length, d_input) -> logits (batch, d_output); ``mode`` defaults to ``self.mode``."""
        mode = self.mode if mode is None else mode
        check_choice("mode", mode, MODES)
        h = self._coder("encoder", check_sequence_input("x", x, self.d_input), training)
        for block in self.blocks:
            h = block.forward(h, training=training, mode=mode)
        logits = self._coder("decoder", self.pool.forward(h, training=training), training)
        self._cache = logits.shape
        return logits

    def _coder(self, name: str, x: np.ndarray, training: bool) -> np.ndarray:
        """The encoder or decoder forward, with its weight quantized when ``coder`` is a target."""
        linear = getattr(self, name)
        if name not in self.coder_quant:
            return linear.forward(x, training=training)
        with self.coder_quant[name].forward(training):
            return linear.forward(x, training=training)

    def _coder_backward(self, name: str, grad: np.ndarray) -> np.ndarray:
        linear = getattr(self, name)
        if name not in self.coder_quant:
            return linear.backward(grad)
        with self.coder_quant[name].backward():
            return linear.backward(grad)

    def backward(self, dlogits: np.ndarray) -> np.ndarray:
        """dL/dlogits (batch, d_output) -> dL/dx; fills ``grads``."""
        shape = self._saved()
        dlogits = check_array("dlogits", dlogits, shape=shape)
        g = self.pool.backward(self._coder_backward("decoder", dlogits))
        for block in reversed(self.blocks):
            g = block.backward(g)
        return self._coder_backward("encoder", g)

    # -- streaming ------------------------------------------------------------
    def initial_state(self, batch: int) -> "StreamState":
        """The state before the first step: zero SSM states, an empty mean (``StreamState``)."""
        c = self.config
        ssm = tuple(zero_state(batch, c["d_model"], c["d_state"], self.dtype, mode_major=True) for _ in self.blocks)
        pool_sum = np.zeros(ssm[0].shape[1:]) if c["pool"] == "mean" else None
        return StreamState(ssm, pool_sum, 0)

    def stream(self, fused: bool = True) -> "S4DModelStream":
        """This model in evaluation, frozen for streaming (``S4DModelStream``): every per-stream
        constant is derived once here; then ``stream.step(x_t, state)`` costs the arithmetic only
        (one fused kernel call per step; ``fused=False``: the per-op Python path)."""
        return S4DModelStream(self, "S4DModel.stream()", fused=fused)

    def step(self, x_t: np.ndarray, state: "StreamState") -> tuple[np.ndarray, "StreamState"]:
        """One time step in evaluation: x_t (batch, d_input), ``state`` from ``initial_state(batch)``
        or the previous step -> (logits (batch, d_output) of the sequence so far, new state).

        Derives every layer's (quantized) parameters anew on each call; to stream many
        steps build ``stream()`` once and step it (same results).
        """
        return S4DModelStream(self, "S4DModel.step()", track=False).step(x_t, state)

    def _frozen_coder(self, name: str) -> Linear:
        """A copy of the encoder or decoder with the weight an evaluation forward uses (quantized
        when ``coder`` is a target)."""
        linear = snapshot(getattr(self, name))
        if name in self.coder_quant:
            q = self.coder_quant[name].quantizer
            with kept_caches(q):  # leave a pending backward's cache alone
                linear._params["weight"] = q.forward(linear._params["weight"], training=False)
        return linear

    # -- optimizer groups -----------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter names split for the optimizer:

        ``[{"names": [...], "ssm": False}, {"names": [...], "ssm": True}]``, plus
        ``{"names": [...], "ssm": False, "weight_decay": 0.0}`` when the model has
        learned (LSQ) quantizer steps. The ``ssm`` group holds every S4D layer's
        ``log_dt``, ``log_A_real``, ``A_imag`` (and ``B`` when learned) or its
        discrete ``Abar_rho``, ``Abar_theta``, ``Bbar``; the recipe trains it with
        lr min(0.001, lr) and weight decay 0. Quantizer steps get the base lr and no
        weight decay: decay would shrink every step toward 0, i.e. push the range
        to clip more and more values (LSQ trains steps without decay). Everything
        else (C, D, mixing, norms, encoder, decoder) is the main group. Every
        parameter is in exactly one group; names keep ``.params`` order.
        """
        steps = {f"{prefix}.{key}" for prefix, module in self.modules() if isinstance(module, Quantizer)
                 for key in module.params}
        ssm, main, quant = [], [], []
        for name in self.params:
            parts = name.split(".")
            is_ssm = len(parts) >= 2 and parts[-2] == "ssm" and parts[-1] in SSM_PARAM_NAMES
            (quant if name in steps else ssm if is_ssm else main).append(name)
        groups = [{"names": main, "ssm": False}, {"names": ssm, "ssm": True}]
        if quant:
            groups.append({"names": quant, "ssm": False, "weight_decay": 0.0})
        return groups

    # -- files ----------------------------------------------------------------
    def named_buffers(self) -> dict[str, np.ndarray]:
        """Every submodule's buffers (BatchNorm running statistics) under dotted names (shared arrays)."""
        return {f"{prefix}.{key}": value for prefix, module in self.modules()
                for key, value in getattr(module, "buffers", {}).items()}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Parameters under ``params/<name>`` and buffers under ``buffers/<name>`` (shared arrays)."""
        arrays = {f"params/{k}": v for k, v in self.params.items()}
        arrays.update({f"buffers/{k}": v for k, v in self.named_buffers().items()})
        return arrays

    def save(self, path: str | os.PathLike) -> None:
        """Write ``<path>.npz`` (parameters and buffers) and ``<path>.json`` (config, format version).

        Each file is written atomically; the arrays go first, so the JSON that
        ``load`` starts from never names arrays that are not on disk yet.
        """
        path = Path(path)
        arrays = self.state_arrays()
        atomic_save_npz(path.with_name(path.name + ".npz"), arrays)
        atomic_write_json(path.with_name(path.name + ".json"), {
            "format": "qs4d_np.S4DModel", "format_version": FORMAT_VERSION, "config": self.config,
            "arrays": {k: list(v.shape) for k, v in arrays.items()}})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "S4DModel":
        """Rebuild a model written by ``save`` and load its arrays (never unpickles).

        Raises ValueError naming the key when an array is missing, unexpected,
        or has the wrong shape, and when the format version is unknown.
        """
        path = Path(path)
        meta = load_json(path.with_name(path.name + ".json"))
        if not isinstance(meta, dict) or meta.get("format") != "qs4d_np.S4DModel":
            raise ValueError(f"{path}.json is not an S4DModel file (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}.json has format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        config = dict(meta["config"])
        if config.get("quant") is not None:
            config["quant"] = QuantConfig.from_dict(config["quant"])
        model = cls(**config)
        model.load_arrays(load_npz(path.with_name(path.name + ".npz")), source=f"{path}.npz")
        return model

    def _load_range_buffers(self, arrays: dict[str, np.ndarray], source: str) -> None:
        """Restore quantizers' running ranges first: an uncalibrated quantizer has no buffers yet,
        so its ``buffers/<name>.running_lo`` / ``running_hi`` would otherwise look unexpected."""
        for prefix, module in self.modules():
            if isinstance(module, Quantizer) and module.scale_mode == "running":
                keys = {k: f"buffers/{prefix}.{k}" for k in ("running_lo", "running_hi")}
                present = [k for k, key in keys.items() if key in arrays]
                if not present:
                    continue
                if len(present) == 1:
                    raise ValueError(f"{source} has {keys[present[0]]!r} without its partner range array")
                lo, hi = (np.asarray(arrays[keys[k]]) for k in ("running_lo", "running_hi"))
                for k, v in (("running_lo", lo), ("running_hi", hi)):
                    if v.shape != (module.n_scales,):
                        raise ValueError(f"{source}: array {keys[k]!r} has shape {v.shape}, "
                                         f"expected ({module.n_scales},)")
                module.load_buffers({"running_lo": lo, "running_hi": hi})

    def load_arrays(self, arrays: dict[str, np.ndarray], source: str = "arrays") -> None:
        """Copy ``state_arrays()``-keyed arrays into this model in place, checking names and shapes."""
        self._load_range_buffers(arrays, source)
        own = self.state_arrays()
        missing = sorted(set(own) - set(arrays))
        unexpected = sorted(set(arrays) - set(own))
        if missing:
            raise ValueError(f"{source} is missing array {missing[0]!r} (and {len(missing) - 1} more)")
        if unexpected:
            raise ValueError(f"{source} has unexpected array {unexpected[0]!r} (and {len(unexpected) - 1} more)")
        for key, target in own.items():
            value = arrays[key]
            if value.shape != target.shape:
                raise ValueError(f"{source}: array {key!r} has shape {value.shape}, expected {target.shape}")
            if np.iscomplexobj(value) and not np.iscomplexobj(target):
                raise ValueError(f"{source}: array {key!r} is complex, expected real {target.dtype}")
            target[...] = value


@dataclass(frozen=True)
class StreamState:
    """What a streamed ``S4DModel`` carries from one time step to the next.

    * ``ssm``: one (d_state/2, batch, d_model) complex array per block, its layer's SSM state
      (the quantized state where the state is quantized), mode-major as ``S4DStepper``'s
      (``ssm[i].transpose(1, 2, 0)`` is ``S4D.step``'s (batch, d_model, d_state/2));
    * ``pool_sum``: mean pooling: (batch, d_model) float64, the sum over the steps so far of the
      last block's outputs; None for last pooling (the prediction needs only the current step);
    * ``steps``: the number of steps taken (the mean's divisor).

    Steps return a new state and never modify the one passed in, so a state can be kept to
    branch from. ``S4DModelStream.step`` checks it against the model and x_t's batch.
    """

    ssm: tuple[np.ndarray, ...]
    pool_sum: np.ndarray | None
    steps: int

    def __post_init__(self) -> None:
        if not isinstance(self.ssm, tuple) or not self.ssm or not all(isinstance(s, np.ndarray) for s in self.ssm):
            raise TypeError(f"StreamState.ssm must be a non-empty tuple of arrays (one per block), got {self.ssm!r}")
        check_int("StreamState.steps", self.steps, min_value=0)

    @classmethod
    def _of(cls, ssm: tuple[np.ndarray, ...], pool_sum: np.ndarray | None, steps: int) -> "StreamState":
        """A state from a stream's own step, whose fields are valid by construction: the checks of
        ``__post_init__`` skipped (they cost about as much as a fused step's other bookkeeping)."""
        state = object.__new__(cls)
        for name, value in (("ssm", ssm), ("pool_sum", pool_sum), ("steps", steps)):
            object.__setattr__(state, name, value)
        return state

    @property
    def batch(self) -> int:
        return self.ssm[0].shape[1]


class S4DModelStream:
    """An ``S4DModel`` in evaluation, frozen for streaming one input sample per time step
    (``S4DModel.stream()``).

    Built once: copies of the encoder and decoder with their (quantized) weights, one
    ``BlockStepper`` per block (each layer's quantized SSM parameters, state quantizer, mixing
    weight and act scales derived once) and the pooling, and (``fused``, the default) those
    packed for the fused kernel (``models.stream_pack.PackedStream``, ``kernels.stream``).
    ``step(x_t, state)`` runs encoder -> blocks -> pooling -> decoder on x_t (batch, d_input)
    and returns (logits (batch, d_output), new ``StreamState``); ``run(x, state)`` does that for
    every step of x (batch, T, d_input) in one kernel call. The logits after step t are those of
    ``forward(x[:, :t+1], mode="recurrent")`` in evaluation to rounding, and bit for bit where
    the arithmetic is the same: the quantized or clipped SSM core (the scan kernel's order),
    GELU, the act quantizer, residual, the norms (LayerNorm by the forward's own kernel),
    pooling, the encoder at d_input = 1 (one product; BLAS's own otherwise) and the decoder (the
    same BLAS product on the same (batch, H) rows). Not so: the mixing product, summed in input
    order where BLAS fuses and reorders (a few ulp, which a quantized act absorbs except at a
    rounding edge), and a float state, which the forward's scan sums reassociated. Hence a QAT
    model in float64 streams its forward's logits exactly. ``fused=False`` steps the per-op
    Python path instead (the mixing in BLAS on batch rows; the same guarantees), and ``run``
    then loops ``step``.

    A snapshot: parameters, buffers (BatchNorm statistics) or quantizer ranges changed in the
    model after ``stream()`` do not reach it; ``is_current()`` says whether the model still holds
    what the stream was built from; build a new stream after a change. State and act ranges must
    be static (``fixed``, calibrated ``running``, initialised ``learned``): a data-dependent
    (``absmax``) range is refused with an error naming the layer and the quantizer.
    ``track=False`` skips the snapshot behind ``is_current`` (``S4DModel.step``'s one-step use).
    """

    def __init__(self, model: S4DModel, where: str = "S4DModelStream", track: bool = True,
                 fused: bool = True) -> None:
        c = model.config
        self.d_input, self.d_model, self.d_state = model.d_input, c["d_model"], c["d_state"]
        self.dtype, self.pool = model.dtype, c["pool"]
        self.blocks = [BlockStepper(b, f"{where}, layer {i} (layers.{i}.ssm)", track=False)
                       for i, b in enumerate(model.blocks)]
        self.encoder = model._frozen_coder("encoder")
        self.decoder = model._frozen_coder("decoder")
        self.packed = PackedStream(self) if check_bool("fused", fused) else None
        self._cdtype = np.result_type(self.dtype, np.complex64)
        self._model = model
        self._snapshot = ParamSnapshot(model, track)

    @property
    def fused(self) -> bool:
        """Whether ``step`` and ``run`` run the fused kernel (else the per-op Python path)."""
        return self.packed is not None

    def initial_state(self, batch: int) -> StreamState:
        """The state before the first step (``S4DModel.initial_state``)."""
        return self._model.initial_state(batch)

    def is_current(self) -> bool:
        """Whether the model's parameters and buffers are still those this stream was built from."""
        return self._snapshot.is_current()

    def _state_fits(self, state: object, batch: int) -> bool:
        """The cheap test every fused step runs: True when ``state`` passes ``_check_state`` and its
        SSM states are C-contiguous (what the kernel takes); False sends it the long way."""
        if type(state) is not StreamState or len(state.ssm) != len(self.blocks):
            return False
        pool = state.pool_sum
        if self.pool == "mean":
            if type(pool) is not np.ndarray or pool.shape != (batch, self.d_model) or pool.dtype != np.float64:
                return False
        elif pool is not None:
            return False
        shape, cdtype = (self.d_state // 2, batch, self.d_model), self._cdtype
        for s in state.ssm:
            if s.shape != shape or s.dtype != cdtype or not s.flags.c_contiguous:
                return False
        return True

    def _check_state(self, state: object, batch: int) -> StreamState:
        if self._state_fits(state, batch):
            return state
        if not isinstance(state, StreamState):
            raise TypeError(f"state must be a StreamState (from initial_state(batch) or the previous step), "
                            f"got {type(state).__name__}")
        if len(state.ssm) != len(self.blocks):
            raise ValueError(f"state.ssm must hold {len(self.blocks)} arrays (one per block), got {len(state.ssm)}")
        shape = (self.d_state // 2, batch, self.d_model)
        for i, s in enumerate(state.ssm):
            if s.shape != shape or s.dtype != self._cdtype:
                raise ValueError(f"state.ssm[{i}] must have shape {shape} and dtype {self._cdtype} (x_t has batch "
                                 f"{batch}), got shape {s.shape} and dtype {s.dtype}")
        if self.pool == "mean":
            if not (isinstance(state.pool_sum, np.ndarray) and state.pool_sum.shape == shape[1:]
                    and state.pool_sum.dtype == np.float64):
                got = (f"shape {state.pool_sum.shape} and dtype {state.pool_sum.dtype}"
                       if isinstance(state.pool_sum, np.ndarray) else repr(state.pool_sum))
                raise ValueError(f"state.pool_sum must be a float64 array of shape {shape[1:]} for mean pooling, "
                                 f"got {got}")
        elif state.pool_sum is not None:
            raise ValueError("state.pool_sum must be None for last pooling (the state of a mean-pooling model?)")
        return state

    def _check_x_t(self, x_t: object) -> np.ndarray:
        """x_t (batch, d_input) checked (finite values, shape) and C-contiguous in the dtype."""
        x_t = check_array("x_t", x_t, ndim=2, min_size=1)
        if x_t.shape[1] != self.d_input:
            raise ValueError(f"x_t must have shape (batch, {self.d_input}), got {x_t.shape}")
        return np.ascontiguousarray(x_t, dtype=self.dtype)

    def step(self, x_t: np.ndarray, state: StreamState) -> tuple[np.ndarray, StreamState]:
        """x_t (batch, d_input) -> (logits (batch, d_output) after this step, new state)."""
        packed = self.packed
        if packed is None:
            x_t = self._check_x_t(x_t)
            return self._python_step(x_t, self._check_state(state, x_t.shape[0]))
        # The common case in a few attribute tests; the fused kernel checks x_t's values (d_input 1).
        fast = (type(x_t) is np.ndarray and x_t.dtype == self.dtype and x_t.ndim == 2 and x_t.shape[1] == self.d_input
                and x_t.shape[0] >= 1 and x_t.flags.c_contiguous and packed.encode)
        if not fast:
            x_t = self._check_x_t(x_t)
        ssm = state.ssm if self._state_fits(state, x_t.shape[0]) else self._kernel_states(state, x_t, fast)
        logits, ssm, pool_sum = packed.run(x_t[None], ssm, state.pool_sum, state.steps, "x_t")
        return logits[0], StreamState._of(ssm, pool_sum, state.steps + 1)

    def _kernel_states(self, state: object, x_t: np.ndarray, x_unchecked: bool) -> tuple[np.ndarray, ...]:
        """The long way of a fused step's checks: the errors in the checked path's order (x_t's
        first), then the SSM states C-contiguous."""
        if x_unchecked:
            self._check_x_t(x_t)
        state = self._check_state(state, x_t.shape[0])
        return tuple(np.ascontiguousarray(s) for s in state.ssm)

    def _python_step(self, x_t: np.ndarray, state: StreamState) -> tuple[np.ndarray, StreamState]:
        """``step`` on checked input by the per-op path: the frozen ops one after another."""
        h = self.encoder.forward(x_t)
        ssm = []
        for block, s in zip(self.blocks, state.ssm):
            h, s = block._step(h, s)
            ssm.append(s)
        steps = state.steps + 1
        pool_sum = None
        if self.pool == "mean":
            pool_sum = state.pool_sum + h
            h = (pool_sum / steps).astype(self.dtype)
        return self.decoder.forward(h), StreamState(tuple(ssm), pool_sum, steps)

    def run(self, x: np.ndarray, state: StreamState | None = None) -> tuple[np.ndarray, StreamState]:
        """Every step of x (batch, T, d_input) from ``state`` (default ``initial_state(batch)``) ->
        (logits (batch, T, d_output) after each step, the state after the last): ``step`` T times,
        bit for bit, in one kernel call."""
        x = check_sequence_input("x", x, self.d_input)
        state = self.initial_state(x.shape[0]) if state is None else self._check_state(state, x.shape[0])
        if self.packed is None:
            logits = []
            for t in range(x.shape[1]):
                out, state = self.step(x[:, t], state)
                logits.append(out)
            return np.stack(logits, axis=1), state
        steps = np.ascontiguousarray(x.transpose(1, 0, 2), dtype=self.dtype)  # (T, batch, d_input)
        ssm = tuple(np.ascontiguousarray(s) for s in state.ssm)
        logits, ssm, pool_sum = self.packed.run(steps, ssm, state.pool_sum, state.steps, "x")
        return logits.transpose(1, 0, 2), StreamState._of(ssm, pool_sum, state.steps + x.shape[1])
