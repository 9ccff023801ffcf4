"""The S4D layer: diagonal SSM (convolution or recurrent mode) -> activation -> dropout -> mixing.

Block order as in the state-spaces S4D example: y = SSM(u) + D*u, then
activation (GELU by default), channel dropout, pointwise H -> 2H + GLU. The
residual connection and the norm belong to the model's block, not here.
"""
from __future__ import annotations

import math

import numpy as np

from qs4d_np.core.activations import GELU, ReLU
from qs4d_np.core.checks import (check_array, check_choice, check_float, check_grad_like, check_int,
                                 check_sequence_input)
from qs4d_np.core.dropout import Dropout
from qs4d_np.core.mixing import PointwiseGLU
from qs4d_np.core.module import Module
from qs4d_np.kernels.scan import scan, scan_backward
from qs4d_np.ssm.discretize import DISCRETIZATIONS, DiscreteSSM, discretize, discretize_backward
from qs4d_np.ssm.fftconv import causal_conv, causal_conv_backward
from qs4d_np.ssm.kernel import ssm_kernel, ssm_kernel_backward

INITS = ("lin", "inv", "real", "qs4d")
ACTIVATIONS = {"gelu": GELU, "relu": ReLU, None: None}
MIXINGS = ("glu", None)
MODES = ("conv", "recurrent")


def init_A(init: str, H: int, d_state: int) -> tuple[np.ndarray, np.ndarray]:
    """(log_A_real, A_imag), each (H, d_state/2) float64, for one of ``INITS``."""
    n = np.arange(d_state // 2, dtype=np.float64)
    log_A_real = np.full(n.shape, math.log(0.5))
    if init == "lin":
        A_imag = math.pi * n
    elif init == "qs4d":
        A_imag = math.pi * n / 4
    elif init == "inv":
        A_imag = d_state / math.pi * (d_state / (2 * n + 1) - 1)
    else:  # "real": A = -(n + 1)
        log_A_real = np.log(n + 1)
        A_imag = np.zeros_like(n)
    return np.tile(log_A_real, (H, 1)), np.tile(A_imag, (H, 1))


def _inference(op: Module, x: np.ndarray) -> np.ndarray:
    """op.forward(x) for streaming, keeping the op's cache so a pending backward still works."""
    saved = op._cache
    try:
        return op.forward(x, training=False)
    finally:
        op._cache = saved


class S4D(Module):
    """S4D layer on (batch, length, d_model) inputs.

    Parameters (H = d_model, M = d_state/2 complex modes): ``log_dt`` (H,),
    ``log_A_real`` (H, M), ``A_imag`` (H, M), ``C`` (H, M) complex, ``D`` (H,)
    and, with ``learn_B``, ``B`` (H, M) complex (initialised to ones). Children
    ``activation``, ``dropout`` and ``mixing`` exist when enabled.

    ``forward(u, training, mode)`` runs the SSM as an FFT convolution with the
    kernel K (``mode="conv"``) or as the Numba recurrence (``"recurrent"``);
    both give the same outputs and parameter gradients up to rounding.
    """

    def __init__(self, d_model: int, d_state: int = 64, *, init: str = "lin", disc: str = "zoh",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, activation: str | None = "gelu",
                 mixing: str | None = "glu", dropout: float = 0.0, learn_B: bool = False,
                 dtype: type = np.float32, seed: int | np.random.Generator | None = None) -> None:
        super().__init__()
        H = check_int("d_model", d_model, min_value=1)
        N = check_int("d_state", d_state, min_value=2)
        if N % 2:
            raise ValueError(f"d_state must be even (N/2 complex modes), got {N}")
        check_choice("init", init, INITS)
        check_choice("disc", disc, DISCRETIZATIONS)
        check_choice("activation", activation, tuple(ACTIVATIONS))
        check_choice("mixing", mixing, MIXINGS)
        dt_min = check_float("dt_min", dt_min, min_value=0.0, min_inclusive=False)
        dt_max = check_float("dt_max", dt_max)
        if dt_max <= dt_min:
            raise ValueError(f"dt_max must be > dt_min, got dt_min={dt_min}, dt_max={dt_max}")
        dropout = check_float("dropout", dropout, min_value=0.0, max_value=1.0, max_inclusive=False)
        if not isinstance(learn_B, (bool, np.bool_)):
            raise TypeError(f"learn_B must be a bool, got {learn_B!r}")
        self.dtype = np.dtype(dtype)
        check_choice("dtype", self.dtype, (np.dtype(np.float32), np.dtype(np.float64)))
        self.cdtype = np.result_type(self.dtype, np.complex64)
        self.d_model, self.d_state, self.disc, self.init = H, N, disc, init
        M = N // 2

        rng = np.random.default_rng(seed)
        log_A_real, A_imag = init_A(init, H, N)
        p = self._params
        p["log_dt"] = rng.uniform(math.log(dt_min), math.log(dt_max), H).astype(self.dtype)
        p["log_A_real"] = log_A_real.astype(self.dtype)
        p["A_imag"] = A_imag.astype(self.dtype)
        p["C"] = (math.sqrt(0.5) * (rng.standard_normal((H, M)) + 1j * rng.standard_normal((H, M)))).astype(self.cdtype)
        p["D"] = rng.standard_normal(H).astype(self.dtype)
        if learn_B:
            p["B"] = np.ones((H, M), dtype=self.cdtype)
        dropout_rng, mixing_rng = rng.spawn(2)

        self.activation = None if activation is None else self.add_child("activation", ACTIVATIONS[activation]())
        self.dropout = self.add_child("dropout", Dropout(dropout, seed=dropout_rng)) if dropout > 0 else None
        self.mixing = (self.add_child("mixing", PointwiseGLU(H, dtype=self.dtype, seed=mixing_rng))
                       if mixing == "glu" else None)

    # -- the SSM core -------------------------------------------------------
    def discrete(self) -> DiscreteSSM:
        """The current (Abar, Bbar) and intermediates, complex128."""
        p = self._params
        return discretize(p["log_dt"], p["log_A_real"], p["A_imag"], p.get("B"), self.disc)

    def kernel(self, L: int) -> np.ndarray:
        """The convolution kernel K (H, L) in the layer's dtype."""
        L = check_int("L", L, min_value=1)
        d = self.discrete()
        return ssm_kernel(self._params["C"] * d.Bbar, d.Abar, L).astype(self.dtype)

    def _post_ops(self) -> list[Module]:
        return [op for op in (self.activation, self.dropout, self.mixing) if op is not None]

    def forward(self, u: np.ndarray, training: bool = False, mode: str = "conv") -> np.ndarray:
        """u (batch, length, d_model) -> (batch, length, d_model)."""
        check_choice("mode", mode, MODES)
        u = np.ascontiguousarray(check_sequence_input("u", u, self.d_model), dtype=self.dtype)
        d = self.discrete()
        C, D = self._params["C"], self._params["D"]
        if mode == "conv":
            Ct = C * d.Bbar
            K = ssm_kernel(Ct, d.Abar, u.shape[1])
            K[:, 0] += D  # the skip D*u is the kernel's lag-0 tap
            conv, u_f_conj, K_f = causal_conv(u, K)
            y = np.ascontiguousarray(conv)
            self._cache = (mode, d, u.shape, Ct, u_f_conj, K_f)
        else:
            y = scan(u, d.Abar, d.Bbar, C, D)
            self._cache = (mode, d, u.shape, u)
        for op in self._post_ops():
            y = op.forward(y, training=training)
        return y

    def backward(self, grad: np.ndarray) -> np.ndarray:
        """dL/dy (batch, length, d_model) -> dL/du; fills ``grads`` for the mode that ran forward."""
        mode, d, shape, *saved = self._saved()
        g = check_grad_like("grad", grad, shape).astype(self.dtype, copy=False)
        for op in reversed(self._post_ops()):
            g = op.backward(g)
        C, D = self._params["C"], self._params["D"]
        if mode == "conv":
            Ct, u_f_conj, K_f = saved
            conv, dK = causal_conv_backward(g, u_f_conj, K_f)
            du = np.ascontiguousarray(conv)
            g_D = dK[:, 0]
            g_Ct, g_Abar = ssm_kernel_backward(dK.astype(np.float64), Ct, d.Abar)
            g_C = np.conj(d.Bbar) * g_Ct
            g_Bbar = np.conj(C) * g_Ct
        else:
            (u,) = saved
            du, g_Abar, g_Bbar, g_C = scan_backward(u, g, d.Abar, d.Bbar, C, D)
            g_D = np.einsum("bth,bth->h", g, u)
        grads = discretize_backward(d, self._params.get("B"), g_Abar, g_Bbar)
        grads["C"] = g_C
        grads["D"] = g_D
        self._grads = {name: grads[name].astype(value.dtype) for name, value in self._params.items()}
        return du

    # -- streaming ----------------------------------------------------------
    def initial_state(self, batch: int) -> np.ndarray:
        """Zero state (batch, d_model, d_state/2) complex."""
        batch = check_int("batch", batch, min_value=1)
        return np.zeros((batch, self.d_model, self.d_state // 2), dtype=self.cdtype)

    def step(self, u_t: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One time step for inference: u_t (batch, d_model), state from ``initial_state``.

        Returns (y_t (batch, d_model), new state); applies activation and mixing
        (never dropout) and leaves the forward caches of ``forward`` untouched.
        """
        u_t = check_array("u_t", u_t, ndim=2)
        if u_t.shape[1] != self.d_model:
            raise ValueError(f"u_t must have shape (batch, {self.d_model}), got {u_t.shape}")
        M = self.d_state // 2
        state = check_array("state", state, shape=(u_t.shape[0], self.d_model, M), allow_complex=True)
        d = self.discrete()
        u_t = u_t.astype(self.dtype, copy=False)
        x = (d.Abar.astype(self.cdtype) * state + d.Bbar.astype(self.cdtype) * u_t[:, :, None]).astype(self.cdtype)
        y = 2 * np.einsum("hm,bhm->bh", self._params["C"], x).real + self._params["D"] * u_t
        y = y.astype(self.dtype, copy=False)
        for op in (self.activation, self.mixing):
            if op is not None:
                y = _inference(op, y)
        return y, x
