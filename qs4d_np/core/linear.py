"""Affine map over the last axis: y = x @ weight + bias (BLAS on a 2-D view, rows split over threads)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np

from qs4d_np.core.checks import check_array, check_bool, check_int
from qs4d_np.core.module import Module
from qs4d_np.core.perturb import ValuePerturbation, perturbed
from qs4d_np.kernels.matmul import matmul, matmul_tn


def sum_rows(g2: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Column sums of a (rows, C) array accumulated in float64, returned in ``dtype``.

    float32 sums over ~50k rows would otherwise lose about three digits.
    """
    return g2.sum(axis=0, dtype=np.float64).astype(dtype, copy=False)


class Linear(Module):
    """y = x @ weight + bias over the last axis; any leading dims.

    Params: ``weight`` (d_in, d_out), ``bias`` (d_out,) (absent when bias=False),
    both initialised uniform in +-1/sqrt(d_in) as in PyTorch's nn.Linear.
    x (..., d_in) -> y (..., d_out). The ``weight`` and ``bias`` properties read
    the arrays the forward computes with; ``swapped_weight`` runs a forward and
    backward with another weight (a fake-quantized one, ``quant.weights``).
    ``perturbation`` (``core.perturb``, key ``"weight"``): when set, every forward
    computes with the perturbed weight (fresh per forward, drawn from the weight
    after any swap) and its backward with the same array; dL/dW is unchanged
    (straight through).
    """

    perturbation: ValuePerturbation | None = None

    def __init__(self, d_in: int, d_out: int, *, bias: bool = True,
                 dtype: type = np.float32, seed: int | np.random.Generator | None = None) -> None:
        super().__init__()
        self.d_in = check_int("d_in", d_in, min_value=1)
        self.d_out = check_int("d_out", d_out, min_value=1)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        rng = np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(self.d_in)
        self._params["weight"] = rng.uniform(-bound, bound, (self.d_in, self.d_out)).astype(self.dtype)
        if bias:
            self._params["bias"] = rng.uniform(-bound, bound, self.d_out).astype(self.dtype)

    @property
    def weight(self) -> np.ndarray:
        """The (d_in, d_out) weight the forward multiplies by: the ``weight`` parameter, or inside
        ``swapped_weight`` the array swapped in. The array itself, not a copy: treat it as read-only
        (an optimizer updates the parameter in place through ``params``)."""
        return self._params["weight"]

    @property
    def bias(self) -> np.ndarray | None:
        """The (d_out,) bias the forward adds (the ``bias`` parameter, not a copy), None when built
        with ``bias=False``."""
        return self._params.get("bias")

    @contextmanager
    def swapped_weight(self, W: np.ndarray) -> Iterator[None]:
        """Inside, the forward and backward compute with ``W`` (d_in, d_out) in place of the weight
        parameter, which is not modified and is the weight again on exit (also after an error).

        A backward run inside writes dL/dW to ``grads["weight"]``; a caller that maps it back to
        the parameter (a straight-through estimator) stores the result with ``set_grad``.
        """
        W = check_array("W", W, shape=(self.d_in, self.d_out), finite=False)
        saved = self._params["weight"]
        self._params["weight"] = W
        try:
            yield
        finally:
            self._params["weight"] = saved

    @contextmanager
    def forward_weight(self) -> Iterator[np.ndarray]:
        """Inside, ``weight`` is the weight one forward computes with, which is yielded: the weight
        itself, or with a ``perturbation`` a perturbed copy swapped in (one fresh value per call).
        A caller keeps the yielded array for its backward."""
        W = perturbed(self.perturbation, "weight", self.weight)
        if W is self.weight:
            yield W
            return
        with self.swapped_weight(W):
            yield W

    def rows(self, x: np.ndarray) -> np.ndarray:
        """Check x (..., d_in) and return it as a C-contiguous (rows, d_in) array of ``dtype``."""
        x = check_array("x", x, finite=False)
        if x.ndim < 1 or x.shape[-1] != self.d_in:
            raise ValueError(f"x must have shape (..., {self.d_in}), got {x.shape}")
        return np.ascontiguousarray(x, dtype=self.dtype).reshape(-1, self.d_in)

    def product(self, x2: np.ndarray, n_seq: int | None = None) -> np.ndarray:
        """x2 (rows, d_in) -> x2 @ weight (rows, d_out), without the bias. ``n_seq``: the rows are that
        many sequences of equal length, in order (None: one row each); an analog subclass
        calibrates its converters per sequence."""
        return matmul(x2, self.weight)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        training = check_bool("training", training)
        x2 = self.rows(x)
        with self.forward_weight() as W:
            y = self.product(x2, x.shape[0] if x.ndim > 1 else None)
        if "bias" in self._params:
            y += self._params["bias"]
        self._cache = (x2, x.shape, W)
        return y.reshape(*x.shape[:-1], self.d_out)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        x2, shape, W = self._saved()
        out_shape = (*shape[:-1], self.d_out)
        grad = check_array("grad", grad, shape=out_shape, finite=False)
        g2 = np.ascontiguousarray(grad, dtype=self.dtype).reshape(-1, self.d_out)
        self._grads["weight"] = matmul_tn(x2, g2)
        if "bias" in self._params:
            self._grads["bias"] = sum_rows(g2, self.dtype)
        return matmul(g2, W.T).reshape(shape)
