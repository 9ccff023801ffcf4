"""One residual block of the S4D model: S4D layer -> channel dropout -> residual add -> norm."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from qs4d_np.core.checks import check_bool, check_choice
from qs4d_np.core.dropout import Dropout
from qs4d_np.core.module import Module
from qs4d_np.core.norm import BatchNorm, LayerNorm
from qs4d_np.core.snapshot import ParamSnapshot, snapshot
from qs4d_np.ssm.s4d import S4D, S4DStepper
from qs4d_np.ssm.stream import check_step

NORMS = {"layer": LayerNorm, "batch": BatchNorm, None: None}


def compose(x: np.ndarray, ssm: Callable[[np.ndarray], np.ndarray], norm: Callable[[np.ndarray], np.ndarray] | None,
            dropout: Callable[[np.ndarray], np.ndarray] | None, *, prenorm: bool, residual: bool) -> np.ndarray:
    """The block's topology, written once: its forward (whole sequences, (batch, length, H)) and its
    frozen step ((batch, H)) both run it with their own ops (``S4DBlock`` docstring)."""
    z = x
    if prenorm and norm is not None:
        z = norm(z)
    z = ssm(z)
    if dropout is not None:
        z = dropout(z)
    if residual:
        z = z + x
    if not prenorm and norm is not None:
        z = norm(z)
    return z


class S4DBlock(Module):
    """x (batch, length, H) -> (batch, length, H).

    postnorm (default): y = norm(dropout(ssm(x)) + x)
    prenorm:            y = dropout(ssm(norm(x))) + x
    ``residual=False`` drops the "+ x"; ``norm=None`` drops the norm. Children:
    ``ssm`` (S4D, built with the same dropout rate for its inner dropout and
    ``**s4d_options``, e.g. quant, layer, abar), ``dropout`` (channel dropout, only when dropout > 0)
    and ``norm``, so parameters read ``ssm.C``, ``norm.weight``.
    """

    def __init__(self, d_model: int, *, d_state: int = 64, dropout: float = 0.0, norm: str | None = "layer",
                 prenorm: bool = False, residual: bool = True, dtype: type = np.float32,
                 seed: int | np.random.Generator | None = None, **s4d_options: Any) -> None:
        super().__init__()
        check_choice("norm", norm, tuple(NORMS))
        self.prenorm = check_bool("prenorm", prenorm)
        self.residual = check_bool("residual", residual)
        ssm_rng, dropout_rng = np.random.default_rng(seed).spawn(2)
        self.ssm = self.add_child("ssm", S4D(d_model, d_state, dropout=dropout, dtype=dtype, seed=ssm_rng,
                                             **s4d_options))
        self.dropout = self.add_child("dropout", Dropout(dropout, seed=dropout_rng)) if dropout > 0 else None
        self.norm = None if norm is None else self.add_child("norm", NORMS[norm](d_model, dtype=dtype))

    def forward(self, x: np.ndarray, training: bool = False, mode: str = "conv") -> np.ndarray:
        training = check_bool("training", training)
        norm = None if self.norm is None else (lambda z: self.norm.forward(z, training=training))
        drop = None if self.dropout is None else (lambda z: self.dropout.forward(z, training=training))
        # the model checked its input once
        z = compose(x, lambda z: self.ssm.forward(z, training, mode, checked=True), norm, drop,
                    prenorm=self.prenorm, residual=self.residual)
        self._cache = True
        return z

    def backward(self, grad: np.ndarray) -> np.ndarray:
        self._saved()
        if not self.prenorm and self.norm is not None:
            grad = self.norm.backward(grad)
        g = grad
        if self.dropout is not None:
            g = self.dropout.backward(g)
        g = self.ssm.backward(g, checked=True)
        if self.prenorm and self.norm is not None:
            g = self.norm.backward(g)
        if self.residual:
            g = g + grad  # a new array: g may be shared with a cache inside ssm
        return g

    # -- streaming ----------------------------------------------------------
    def initial_state(self, batch: int) -> np.ndarray:
        """The zero state of the block's S4D layer, (batch, d_model, d_state/2) complex."""
        return self.ssm.initial_state(batch)

    def stepper(self) -> "BlockStepper":
        """This block in evaluation, frozen for streaming (``BlockStepper``)."""
        return BlockStepper(self, "stepper()")

    def step(self, x_t: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One time step in evaluation: x_t (batch, d_model), state (batch, d_model, d_state/2)
        complex -> (y_t (batch, d_model), new state). Derives the layer's constants anew on every
        call; to stream many steps build ``stepper()`` once."""
        x_t, state = check_step(x_t, state, self.ssm.d_model, self.ssm.d_state, self.ssm.dtype, "x_t")
        y, x = BlockStepper(self, "step()", track=False).step(x_t, state.transpose(2, 0, 1), checked=True)
        return y, np.ascontiguousarray(x.transpose(1, 2, 0))


class BlockStepper:
    """One ``S4DBlock`` in evaluation, frozen for streaming: the layer's ``S4DStepper`` and a copy
    of the norm (evaluation: BatchNorm with its running statistics), in ``S4DBlock.forward``'s
    order (prenorm / postnorm, residual; dropout is off in evaluation). A snapshot, like
    ``S4DStepper``: ``is_current()`` says whether the block changed since; its state is
    mode-major like ``S4DStepper``'s. ``where`` names the caller in the error for a
    data-dependent (absmax) range; ``track=False`` skips the snapshot behind ``is_current``.
    """

    def __init__(self, block: S4DBlock, where: str = "BlockStepper", track: bool = True) -> None:
        self.ssm = S4DStepper(block.ssm, where, track=False)
        self.norm = None if block.norm is None else snapshot(block.norm)
        self.prenorm, self.residual = block.prenorm, block.residual
        self._snapshot = ParamSnapshot(block, track)

    def initial_state(self, batch: int) -> np.ndarray:
        return self.ssm.initial_state(batch)

    def is_current(self) -> bool:
        """Whether the block's parameters and buffers are still those this stepper was built from."""
        return self._snapshot.is_current()

    def step(self, x_t: np.ndarray, state: np.ndarray, *, checked: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """x_t (batch, d_model), state (d_state/2, batch, d_model) -> (y_t (batch, d_model), new state).
        ``checked``: the caller has checked both and cast them to the layer's dtypes."""
        if not checked:
            s = self.ssm
            x_t, state = check_step(x_t, state, s.d_model, s.d_state, s.dtype, "x_t", mode_major=True)
        new_state = []

        def ssm(z: np.ndarray) -> np.ndarray:
            y, x = self.ssm.step(z, state, checked=True)
            new_state.append(x)
            return y

        norm = None if self.norm is None else self.norm.forward
        return compose(x_t, ssm, norm, None, prenorm=self.prenorm, residual=self.residual), new_state[0]
