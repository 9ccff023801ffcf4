"""S4DModel: encoder -> n residual S4D blocks -> pooling over time -> decoder, with presets and files."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from qs4d_np.core.checks import (check_array, check_bool, check_choice, check_finite_output, check_int,
                                 check_sequence_input)
from qs4d_np.core.linear import Linear
from qs4d_np.core.module import Module
from qs4d_np.core.pooling import LastPool, MeanPool
from qs4d_np.core.snapshot import snapshot
from qs4d_np.io import atomic_save_npz, atomic_write_json, json_get, load_json, load_npz
from qs4d_np.models.block import S4DBlock
from qs4d_np.models.stream import S4DModelStream, StreamState
from qs4d_np.quant.config import QuantConfig
from qs4d_np.quant.quantizer import Quantizer
from qs4d_np.quant.weights import WeightQuant
from qs4d_np.ssm.s4d import ABARS, MODES
from qs4d_np.ssm.stream import zero_state

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
            dropout=dropout, norm=norm, prenorm=check_bool("prenorm", prenorm),
            residual=check_bool("residual", residual), pool=pool, mode=mode,
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
                per_channel = quant.target("coder").per_channel
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
        logits = self.forward_from(self.forward_to(x, 0, training, mode), 0, training, mode)
        self._cache = logits.shape
        return logits

    def forward_to(self, x: np.ndarray, layer: int, training: bool = False, mode: str | None = None) -> np.ndarray:
        """x (batch, length, d_input) -> the input of block ``layer`` (batch, length, d_model): the
        encoder, then blocks 0 .. layer-1. ``forward`` is ``forward_from(forward_to(x, 0), 0)``, so
        ``forward_from(forward_to(x, k), k)`` gives ``forward(x)``'s logits bit for bit for every k
        (what lets pruning re-run only the blocks after a change)."""
        mode = self.mode if mode is None else mode
        check_choice("mode", mode, MODES)
        training = check_bool("training", training)
        check_int("layer", layer, min_value=0, max_value=len(self.blocks))
        # every stage's output is checked, so an overflow is reported where it happened
        h = check_finite_output("encoder", self._coder("encoder", check_sequence_input("x", x, self.d_input),
                                                       training))
        for i, block in enumerate(self.blocks[:layer]):
            h = check_finite_output(f"layers.{i}", block.forward(h, training=training, mode=mode))
        return h

    def forward_from(self, h: np.ndarray, layer: int, training: bool = False, mode: str | None = None) -> np.ndarray:
        """h (batch, length, d_model), the input of block ``layer`` -> logits (batch, d_output): blocks
        ``layer`` .. n-1, pooling, decoder (see ``forward_to``). Leaves no backward cache of the model."""
        mode = self.mode if mode is None else mode
        check_choice("mode", mode, MODES)
        training = check_bool("training", training)
        check_int("layer", layer, min_value=0, max_value=len(self.blocks))
        check_array("h", h, ndim=3, finite=False)  # forward_to checked it
        if h.shape[2] != self.config["d_model"]:
            raise ValueError(f"h must have shape (batch, length, {self.config['d_model']}) (d_model channels), "
                             f"got {h.shape}")
        for i, block in enumerate(self.blocks[layer:], start=layer):
            h = check_finite_output(f"layers.{i}", block.forward(h, training=training, mode=mode))
        return check_finite_output("decoder", self._coder("decoder", self.pool.forward(h, training=training),
                                                          training))

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

    def frozen_coder(self, name: str) -> Linear:
        """A copy of the encoder or decoder (``name``) with the weight an evaluation forward uses
        (quantized when ``coder`` is a target); the model's caches are kept."""
        linear = snapshot(getattr(self, name))
        if name in self.coder_quant:
            linear.params["weight"][...] = self.coder_quant[name].evaluate()  # the copy's own array
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
        source = path.with_name(path.name + ".json")
        meta = load_json(source)
        if not isinstance(meta, dict) or meta.get("format") != "qs4d_np.S4DModel":
            raise ValueError(f"{source} is not an S4DModel file (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{source} has format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        config = dict(json_get(meta, ("config",), source, dict))
        if config.get("quant") is not None:
            config["quant"] = QuantConfig.from_dict(json_get(meta, ("config", "quant"), source, dict))
        try:
            model = cls(**config)
        except (TypeError, ValueError) as exc:  # an edited or foreign config
            raise ValueError(f"{source}: key 'config' does not describe a model: {exc}") from None
        arrays = load_npz(path.with_name(path.name + ".npz"))
        recorded = meta.get("arrays")
        if recorded is not None:  # the shapes the JSON lists must be those of the model and of the file
            own = {k: list(v.shape) for k, v in model.state_arrays().items()}
            for key, shape in json_get(meta, ("arrays",), source, dict).items():
                if key in own and shape != own[key]:
                    raise ValueError(f"{source}: key 'arrays.{key}' records shape {shape}, but the config "
                                     f"gives {own[key]}")
        model.load_arrays(arrays, source=f"{path}.npz")
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
        """Copy ``state_arrays()``-keyed arrays into this model in place, after checking them all: names,
        shapes, dtype kinds (real or complex), finite values, non-negative ``running_var``."""
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
            if value.dtype.kind != target.dtype.kind:
                want = "complex" if target.dtype.kind == "c" else "real"
                raise ValueError(f"{source}: array {key!r} has dtype {value.dtype}, expected {want} "
                                 f"{target.dtype} (the model's)")
            if not np.isfinite(value).all():
                bad = int(value.size - np.count_nonzero(np.isfinite(value)))
                raise ValueError(f"{source}: array {key!r} holds {bad} NaN/inf value(s); expected finite weights")
            if key.endswith(".running_var") and (value < 0).any():
                raise ValueError(f"{source}: array {key!r} holds a negative variance {float(value.min())}; "
                                 "expected values >= 0")
        for key, target in own.items():
            target[...] = arrays[key]
