"""Pointwise channel mixing: Linear H -> 2H, then GLU, with bias add and GLU fused."""
from __future__ import annotations

import numpy as np

from qs4d_np.core.activations import matching_grad
from qs4d_np.core.checks import check_bool, check_int
from qs4d_np.core.linear import Linear
from qs4d_np.core.module import Module
from qs4d_np.kernels.elementwise import glu_backward, glu_forward
from qs4d_np.kernels.matmul import matmul, matmul_tn


class PointwiseGLU(Module):
    """y = GLU(x @ W + b) over the last axis: x (..., H) -> y (..., H).

    Child ``linear`` = Linear(H, 2H) holds the parameters (``linear.weight``
    (H, 2H), ``linear.bias`` (2H,)); the product x @ W is the child's
    (``Linear.product``: BLAS, or the arrays of an analog Linear) and one
    Numba pass adds the bias and applies the gate, so the biased
    pre-activation is never stored. The backward stores the child's gradients
    with ``linear.set_grad``; a weight swapped into the child
    (``Linear.swapped_weight``) is the one both passes use, and so is the
    perturbed weight of one forward (``Linear.forward_weight``).
    """

    def __init__(self, d_model: int, *, dtype: type = np.float32,
                 seed: int | np.random.Generator | None = None) -> None:
        super().__init__()
        self.d_model = check_int("d_model", d_model, min_value=1)
        self.linear = self.add_child("linear", Linear(d_model, 2 * d_model, dtype=dtype, seed=seed))
        self.dtype = self.linear.dtype

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        training = check_bool("training", training)
        x2 = self.linear.rows(x)
        with self.linear.forward_weight() as W:  # perturbed, when the linear's perturbation is set
            z = self.linear.product(x2, x.shape[0] if x.ndim > 1 else None)
        out = np.empty((x2.shape[0], self.d_model), dtype=self.dtype)
        gate = np.empty_like(out)
        glu_forward(z, self.linear.bias, out, gate)
        self._cache = (x2, z, gate, x.shape, W)
        return out.reshape(x.shape)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        x2, z, gate, shape, W = self._saved()
        g2 = matching_grad(grad, shape, self.dtype).reshape(-1, self.d_model)
        dz = np.empty_like(z)
        dbias = glu_backward(z, self.linear.bias, gate, g2, dz)
        self.linear.set_grad("weight", matmul_tn(x2, dz))
        self.linear.set_grad("bias", dbias.astype(self.dtype))
        return matmul(dz, W.T).reshape(shape)
