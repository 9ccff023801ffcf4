"""Fake-quantized weights for ops that read their own ``weight`` parameter (Linear, PointwiseGLU).

``WeightQuant(linear, quantizer)`` runs the op's forward and backward with the
quantized weight W_q swapped in for the parameter W (``Linear.swapped_weight``;
the bias stays float, as the reference). After the backward it replaces the
op's dL/dW_q by the quantizer's straight-through dL/dW (``Linear.set_grad``).
The parameter array itself is never modified, so an optimizer holding it keeps
working.

    wq = WeightQuant(mixing.linear, quantizer)
    with wq.forward(training):
        y = mixing.forward(x)
    ...
    with wq.backward():
        dx = mixing.backward(g)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np

from qs4d_np.core.linear import Linear
from qs4d_np.quant.quantizer import Quantizer


class WeightQuant:
    """Swap a fake-quantized weight into ``linear`` around its forward and backward."""

    def __init__(self, linear: Linear, quantizer: Quantizer) -> None:
        self.linear = linear
        self.quantizer = quantizer
        self._W_q: np.ndarray | None = None

    @contextmanager
    def forward(self, training: bool) -> Iterator[None]:
        """Quantize the weight and run the enclosed forward with it."""
        self._W_q = self.quantizer.forward(self.linear.weight, training=training)
        with self.linear.swapped_weight(self._W_q):
            yield

    @contextmanager
    def backward(self) -> Iterator[None]:
        """Run the enclosed backward with the forward's W_q, then chain dL/dW_q through the STE."""
        if self._W_q is None:
            raise RuntimeError("WeightQuant.backward() called before forward()")
        with self.linear.swapped_weight(self._W_q):
            yield
        dW = self.quantizer.backward(self.linear.grads["weight"])
        self.linear.set_grad("weight", dW.astype(self._W_q.dtype, copy=False))

    def evaluate(self) -> np.ndarray:
        """The quantized weight an evaluation forward computes with (a new array); caches are kept."""
        with self.quantizer.kept_caches():
            return self.quantizer.forward(self.linear.weight, training=False)

    @contextmanager
    def kept(self) -> Iterator[None]:
        """Inside, forwards may run without disturbing a pending backward's quantized weight."""
        W_q = self._W_q
        try:
            yield
        finally:
            self._W_q = W_q
