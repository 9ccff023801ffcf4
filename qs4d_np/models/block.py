"""One residual block of the S4D model: S4D layer -> channel dropout -> residual add -> norm."""
from __future__ import annotations

from typing import Any

import numpy as np

from qs4d_np.core.checks import check_choice
from qs4d_np.core.dropout import Dropout
from qs4d_np.core.module import Module
from qs4d_np.core.norm import BatchNorm, LayerNorm
from qs4d_np.ssm.s4d import S4D

NORMS = {"layer": LayerNorm, "batch": BatchNorm, None: None}


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
        self.prenorm = bool(prenorm)
        self.residual = bool(residual)
        ssm_rng, dropout_rng = np.random.default_rng(seed).spawn(2)
        self.ssm = self.add_child("ssm", S4D(d_model, d_state, dropout=dropout, dtype=dtype, seed=ssm_rng,
                                             **s4d_options))
        self.dropout = self.add_child("dropout", Dropout(dropout, seed=dropout_rng)) if dropout > 0 else None
        self.norm = None if norm is None else self.add_child("norm", NORMS[norm](d_model, dtype=dtype))

    def forward(self, x: np.ndarray, training: bool = False, mode: str = "conv") -> np.ndarray:
        z = x
        if self.prenorm and self.norm is not None:
            z = self.norm.forward(z, training=training)
        z = self.ssm._forward(z, training, mode)  # the model checked its input once
        if self.dropout is not None:
            z = self.dropout.forward(z, training=training)
        if self.residual:
            z = z + x
        if not self.prenorm and self.norm is not None:
            z = self.norm.forward(z, training=training)
        self._cache = True
        return z

    def backward(self, grad: np.ndarray) -> np.ndarray:
        self._saved()
        if not self.prenorm and self.norm is not None:
            grad = self.norm.backward(grad)
        g = grad
        if self.dropout is not None:
            g = self.dropout.backward(g)
        g = self.ssm._backward(g)
        if self.prenorm and self.norm is not None:
            g = self.norm.backward(g)
        if self.residual:
            g = g + grad  # a new array: g may be shared with a cache inside ssm
        return g
