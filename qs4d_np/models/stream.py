"""Streaming a whole ``S4DModel``: ``StreamState`` (what one step hands the next) and
``S4DModelStream`` (the model frozen once, stepping one input sample at a time; fused into one
Numba call per step by ``models.stream_pack``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from qs4d_np.core.checks import check_array, check_bool, check_int, check_sequence_input
from qs4d_np.core.snapshot import ParamSnapshot
from qs4d_np.models.block import BlockStepper
from qs4d_np.models.stream_pack import PackedStream

if TYPE_CHECKING:
    from qs4d_np.models.s4d_model import S4DModel


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
    def unchecked(cls, ssm: tuple[np.ndarray, ...], pool_sum: np.ndarray | None, steps: int) -> "StreamState":
        """A state whose fields the caller guarantees (a stream's own step builds them valid): the
        checks of ``__post_init__`` skipped, as they cost about as much as a fused step's other
        bookkeeping. Anything else builds ``StreamState(...)``, which checks."""
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
    then loops ``step``; so does a model with parts the kernel does not know (an analog model
    from ``hardware.to_analog``), whatever ``fused`` says.

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
        self.encoder = model.frozen_coder("encoder")
        self.decoder = model.frozen_coder("decoder")
        self.packed = PackedStream(self) if check_bool("fused", fused) and PackedStream.accepts(self) else None
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
        return logits[0], StreamState.unchecked(ssm, pool_sum, state.steps + 1)

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
            h, s = block.step(h, s, checked=True)
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
        return logits.transpose(1, 0, 2), StreamState.unchecked(ssm, pool_sum, state.steps + x.shape[1])
