"""A lower bound on the memory an ``S4DModel`` needs, computed from its shape before building it.

So a command can refuse a model or a batch that cannot fit (``--d_model_m 1000000`` asks for
terabytes) with the estimate, instead of a ``MemoryError`` deep inside NumPy or minutes of
allocation. The bound counts only arrays that surely exist, so it never refuses what fits:

* parameters (H = d_model, M = d_state / 2 complex modes, per layer: the mixing weight
  H x 2H and bias, C (H, M) complex, A (H, M) real and imaginary parts, dt, D, norm
  weight, bias and statistics; the encoder and decoder), once for a model and four times
  in training (parameters, gradients, AdamW's two moments);
* in a training step, per layer, four (batch, length, H) activations the backward reads
  (the block input, the SSM output and the GLU's 2H pre-activation) and the convolution
  kernel K (H, length) in float64.

The forward and backward allocate more (FFT buffers, the gradient of each activation), so
the true peak is a few times the bound (``tests/test_reliability.py`` measures it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MemoryEstimate:
    """Lower bounds in bytes: ``params`` (every copy the use needs), ``activations`` (one step)."""

    params: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.activations


def parameter_count(d_input: int, d_output: int, d_model: int, d_state: int, n_layers: int) -> int:
    """Real scalars of the model's parameters and buffers (a complex entry counts twice)."""
    H, M = d_model, d_state // 2
    per_layer = 2 * H * H + 2 * H + 4 * H * M + 6 * H
    return n_layers * per_layer + (d_input + 1) * H + (H + 1) * d_output


def estimate(d_input: int, d_output: int, d_model: int, d_state: int, n_layers: int, *,
             batch: int = 0, length: int = 0, training: bool = False, dtype: type = np.float32) -> MemoryEstimate:
    """The lower bound of the module doc: a built model (``training=False``, batch and length
    unused) or one training step on ``batch`` sequences of ``length`` steps."""
    item = np.dtype(dtype).itemsize
    # Python ints throughout: a shape of 10**9 x 10**9 must not overflow into a small number
    params = parameter_count(int(d_input), int(d_output), int(d_model), int(d_state), int(n_layers)) * item
    if not training:
        return MemoryEstimate(params, 0)
    per_layer = 4 * int(batch) * int(length) * int(d_model) * item + int(d_model) * int(length) * 8
    return MemoryEstimate(4 * params, int(n_layers) * per_layer)
