"""``S4DCore``: the diagonal SSM of one S4D layer, y = SSM(u) + D*u, float or quantized.

The core owns the SSM parameters (H = d_model, M = d_state/2 complex modes), by Abar
parameterization (``abar``):

* ``"continuous"`` (default): ``log_dt`` (H,), ``log_A_real``, ``A_imag`` (H, M) and, with
  ``learn_B``, ``B`` (H, M) complex (ones); Abar, Bbar from the discretization ``disc``;
* ``"discrete"``: ``Abar_rho``, ``Abar_theta`` (H, M), Abar = exp(-softplus(rho) + i*theta)
  inside the unit circle, and ``Bbar`` (H, M) complex, both from the discretized initial A, dt;
* ``"frozen"``: buffer ``Abar`` (the initial discretized value) and learned ``Bbar``;

always ``C`` (H, M) complex and ``D`` (H,), and the quantizer children of its targets
(built from a ``QuantConfig``; a float core has none):

==============  =====================================  ==============================
child           convolution mode (the reference)        recurrent mode (Zhao et al.)
==============  =====================================  ==============================
``quant_A``     A = -exp(log_A_real) + i*A_imag before  -
                discretization (continuous only)
``quant_Abar``  Abar (discrete / frozen)                Abar (real and imaginary
                                                        parts separately by default)
``quant_B``     -                                       Bbar
``quant_C``     C (one scale for both parts by default) C
``quant_D``     - (the reference keeps D float)         D
``quant_dt``    log_dt, then dt = exp(.)                 log_dt, then dt = exp(.)
``quant_K``,    the kernel K and the input u, each with  -
``quant_u``     levels // 2 states (``state`` target)
``quant_x``     -                                       the state after every update
                                                        (``StateQuantizer``, full levels)
==============  =====================================  ==============================

Per-channel scales run over H. ``forward(u, training, mode)`` runs the SSM as an FFT
convolution with the kernel K (``conv``) or as a recurrence (``recurrent``): the float
Numba scan, or, with a ``state`` target or a ``state_clip``, the quantized-state scan
(``quant.scan``; ``state_clip`` bounds |Re x|, |Im x| at every step before quantizing).
The parameter path in both modes is ``ssm.params``. ``backward`` chains the core's
gradients through the quantizers' straight-through estimators and the discretization.
``frozen()`` gives the evaluation-mode recurrent core for streaming (``CoreStep``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qs4d_np.core.checks import (check_array, check_bool, check_choice, check_float, check_grad_like, check_int,
                                 check_sequence_input)
from qs4d_np.core.module import Module
from qs4d_np.core.perturb import ValuePerturbation
from qs4d_np.ssm.scan import scan, scan_backward
from qs4d_np.quant.config import QuantConfig
from qs4d_np.quant.discrete import polar_params
from qs4d_np.quant.quantizer import Quantizer
from qs4d_np.quant.scan import ScanCache, StateQuant, quant_scan, quant_scan_backward
from qs4d_np.quant.state import StateQuantizer
from qs4d_np.ssm.discretize import DISCRETIZATIONS, DiscreteSSM, continuous_A, discretize
from qs4d_np.ssm.fftconv import causal_conv, causal_conv_backward
from qs4d_np.ssm.kernel import ssm_kernel, ssm_kernel_backward
from qs4d_np.ssm.params import PARAM_KEYS, ParamsSaved, SSMParams, float_discrete, ssm_params, ssm_params_backward
from qs4d_np.ssm.stream import CoreStep

INITS = ("lin", "inv", "real", "qs4d")
MODES = ("conv", "recurrent")
ABARS = ("continuous", "discrete", "frozen")
# The core's quantizer keys, in the order their children are registered.
KEYS = PARAM_KEYS + ("K", "u", "x")
# Range sources that do not depend on the data being quantized (streaming, export without calib).
STATIC_SCALE_MODES = ("fixed", "running", "learned")


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


@dataclass(frozen=True)
class Saved:
    """What every mode's backward needs: the parameter path's context and the output shape."""

    params: ParamsSaved
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ConvSaved(Saved):
    """Convolution mode: the parameters it ran with, the kernel's factor Ct = C*Bbar and the FFTs."""

    run: SSMParams
    Ct: np.ndarray
    u_f_conj: np.ndarray
    K_f: np.ndarray


@dataclass(frozen=True)
class ScanSaved(Saved):
    """Recurrent mode, float scan: the parameters it ran with and its input."""

    run: SSMParams
    u: np.ndarray


@dataclass(frozen=True)
class QuantScanSaved(Saved):
    """Recurrent mode, quantized-state scan: the scan's own cache."""

    scan: ScanCache


class S4DCore(Module):
    """The SSM core on (batch, length, d_model) inputs (module docstring).

    ``quant`` (a ``QuantConfig``) and ``layer`` (its per-layer levels) build the quantizer
    children; ``seed`` draws log_dt, C and D (in that order, from one generator).
    ``perturbation`` (``core.perturb``): when set, every ``forward`` computes with the values it
    returns (keys of ``ssm.params``); ``effective``, ``export`` and ``frozen`` stay clean.
    """

    perturbation: ValuePerturbation | None = None

    def __init__(self, d_model: int, d_state: int = 64, *, init: str = "lin", disc: str = "zoh",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, learn_B: bool = False, dtype: type = np.float32,
                 seed: int | np.random.Generator | None = None, quant: QuantConfig | None = None,
                 layer: int | None = None, abar: str = "continuous", state_clip: float | None = None) -> None:
        super().__init__()
        H = check_int("d_model", d_model, min_value=1)
        N = check_int("d_state", d_state, min_value=2)
        if N % 2:
            raise ValueError(f"d_state must be even (N/2 complex modes), got {N}")
        check_choice("init", init, INITS)
        check_choice("disc", disc, DISCRETIZATIONS)
        check_choice("abar", abar, ABARS)
        dt_min = check_float("dt_min", dt_min, min_value=0.0, min_inclusive=False)
        dt_max = check_float("dt_max", dt_max)
        if dt_max <= dt_min:
            raise ValueError(f"dt_max must be > dt_min, got dt_min={dt_min}, dt_max={dt_max}")
        if not isinstance(learn_B, (bool, np.bool_)):
            raise TypeError(f"learn_B must be a bool, got {learn_B!r}")
        if learn_B and abar != "continuous":
            raise ValueError(f"learn_B applies to abar='continuous'; abar={abar!r} learns Bbar directly")
        if quant is not None and not isinstance(quant, QuantConfig):
            raise TypeError(f"quant must be a QuantConfig or None, got {type(quant).__name__}")
        if layer is not None:
            layer = check_int("layer", layer, min_value=0)
        if state_clip is not None:
            state_clip = check_float("state_clip", state_clip, min_value=0.0, min_inclusive=False)
        self.dtype = np.dtype(dtype)
        check_choice("dtype", self.dtype, (np.dtype(np.float32), np.dtype(np.float64)))
        self.cdtype = np.result_type(self.dtype, np.complex64)
        self.d_model, self.d_state, self.disc, self.init = H, N, disc, init
        self.abar, self.quant, self.layer, self.state_clip = abar, quant, layer, state_clip
        self.buffers: dict[str, np.ndarray] = {}
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
        if abar != "continuous":
            d = discretize(p["log_dt"], log_A_real, A_imag, None, disc)
            for name in ("log_dt", "log_A_real", "A_imag"):
                del p[name]
            self.set_discrete(d.Abar, d.Bbar)
        self.q: dict[str, Quantizer | None] = dict.fromkeys(KEYS)
        if quant is not None:
            self._build_quantizers(quant)
            self.init_param_steps()

    # -- quantizers -----------------------------------------------------------
    def _build_quantizers(self, cfg: QuantConfig) -> None:
        H = self.d_model

        def make(key: str, target: str, axis: int, is_complex: bool, halve: bool = False, **extra: Any) -> None:
            o = cfg.target(target)
            n = H if o.per_channel else 1
            if is_complex and o.complex_mode == "cartesian":
                n *= 2
            q = cfg.quantizer_for(target, self.layer, axis=axis, n_scales=n, halve=halve, dtype=self.dtype, **extra)
            if q is not None:
                q.name = f"{key}[{self.layer}]" if self.layer is not None else key
                self.q[key] = self.add_child(f"quant_{key}", q)

        if self.abar == "continuous":
            make("A", "A", 0, True)  # A in convolution mode
        # Abar in recurrent mode (and always for discrete / frozen). Cartesian rounding can push a
        # point with |Abar| < 1 outside the unit circle, and the recurrence then grows like
        # |Abar_q|**L; ``abar_bound`` keeps the codes in the disk (QuantSpec.max_modulus).
        make("Abar", "A", 0, True, **({"max_modulus": 1.0} if cfg.target("A").abar_bound else {}))
        make("B", "B", 0, True)
        make("C", "C", 0, True)
        make("D", "D", 0, False)
        if self.abar == "continuous":
            make("dt", "dt", 0, False)
        make("K", "state", 0, False, halve=True)
        make("u", "state", 2, False, halve=True)
        make("x", "state", 0, True, cls=StateQuantizer)  # one range per tensor, channel, or channel and part

    @property
    def state_quantizer(self) -> StateQuantizer | None:
        """The recurrent state's quantizer (child ``quant_x``) or None for a float state."""
        return self.q["x"]  # type: ignore[return-value]

    def init_param_steps(self) -> None:
        """(Re)initialise the learned steps of the parameter targets (A, Abar, B, C, D, dt) from the
        current parameters (LSQ init). Runs at construction, so no uninitialised step is left for a
        target the training mode never reaches; ``with_quant`` runs it again after copying weights."""
        p, d = self._params, self.discrete()
        A = None if self.abar != "continuous" else continuous_A(p["log_A_real"], p["A_imag"])
        for key, value in (("A", A), ("Abar", d.Abar), ("B", d.Bbar), ("C", p["C"]), ("D", p["D"]),
                           ("dt", p.get("log_dt"))):
            q = self.q[key]
            if q is not None and q.scale_mode == "learned":
                q.reset_step()  # so the forward initialises it from the current value
                with q.kept_caches():
                    q.forward(value)

    def data_range_quantizer(self) -> str | None:
        """Names the state quantizer when its range comes from the data it quantizes (absmax), else None."""
        q = self.q["x"]
        if q is not None and q.scale_mode not in STATIC_SCALE_MODES:
            return f"quantizer {q.name!r} (target 'state', scale_mode={q.scale_mode!r})"
        return None

    # -- parameters -----------------------------------------------------------
    def set_discrete(self, Abar: np.ndarray, Bbar: np.ndarray) -> None:
        """Set Abar and Bbar (H, M) complex of a ``discrete`` or ``frozen`` core (e.g. from a float model)."""
        if self.abar == "continuous":
            raise ValueError("set_discrete needs abar='discrete' or 'frozen'; a continuous layer learns A and dt")
        shape = (self.d_model, self.d_state // 2)
        Abar = check_array("Abar", Abar, shape=shape, allow_complex=True)
        Bbar = check_array("Bbar", Bbar, shape=shape, allow_complex=True)
        if self.abar == "discrete":
            rho, theta = polar_params(Abar.astype(np.complex128))
            self._params["Abar_rho"] = rho.astype(self.dtype)
            self._params["Abar_theta"] = theta.astype(self.dtype)
        else:
            self.buffers["Abar"] = Abar.astype(self.cdtype)
        self._params["Bbar"] = Bbar.astype(self.cdtype)

    def discrete(self) -> DiscreteSSM:
        """The current float (Abar, Bbar) and intermediates, complex128 (no quantization).

        For abar 'discrete' / 'frozen' only ``Abar``, ``Bbar`` (= ``Bbar0``) are set;
        ``dt`` and ``A`` are None.
        """
        return float_discrete(self._params, self.buffers, self.abar, self.disc)

    def kernel(self, L: int) -> np.ndarray:
        """The float convolution kernel K (H, L) in the core's dtype."""
        L = check_int("L", L, min_value=1)
        d = self.discrete()
        return ssm_kernel(self._params["C"] * d.Bbar, d.Abar, L).astype(self.dtype)

    def _run_params(self, training: bool, mode: str,
                    perturbation: ValuePerturbation | None = None) -> tuple[SSMParams, ParamsSaved]:
        return ssm_params(self._params, self.buffers, self.abar, self.disc, self.q, training, mode, perturbation)

    def effective(self, mode: str = "recurrent") -> SSMParams:
        """The SSM parameters an evaluation-mode forward in ``mode`` computes with (``SSMParams``;
        Abar, Bbar, C complex128, D float64); forward caches are kept. In ``conv`` mode Abar comes
        from the quantized A (if any) and B, D are not quantized; the kernel and input quantizers
        (K, u) act on data, not here."""
        check_choice("mode", mode, MODES)
        with self.kept_caches():
            run, _ = self._run_params(False, mode)
        c128 = np.complex128
        return SSMParams(run.Abar.astype(c128), run.Bbar.astype(c128), run.C.astype(c128),
                         run.D.astype(np.float64), run.Abar_float.astype(c128), run.Bbar_float.astype(c128))

    # -- forward / backward -------------------------------------------------------
    @property
    def runs_quant_scan(self) -> bool:
        """Whether recurrent mode runs the quantized-state scan (a state target or a clip)."""
        return self.q["x"] is not None or self.state_clip is not None

    @property
    def clip(self) -> float:
        """The state bound of the quantized scan (inf: none)."""
        return np.inf if self.state_clip is None else float(self.state_clip)

    def forward(self, u: np.ndarray, training: bool = False, mode: str = "conv", *,
                checked: bool = False) -> np.ndarray:
        """u (batch, length, d_model) -> the core output y (batch, length, d_model), D*u included.
        ``checked``: the caller has checked u (shape, finite values) and made it contiguous in
        the core's dtype (the model checks its input once)."""
        training = check_bool("training", training)
        if not checked:
            check_choice("mode", mode, MODES)
            u = np.ascontiguousarray(check_sequence_input("u", u, self.d_model), dtype=self.dtype)
        run, saved = self._run_params(training, mode, self.perturbation)
        if mode == "conv":
            Ct = run.C * run.Bbar
            K = ssm_kernel(Ct, run.Abar, u.shape[1])
            if self.q["K"] is not None:
                K = self.q["K"].forward(K, training=training)
            if self.q["u"] is not None:
                u = self.q["u"].forward(u, training=training)
            K[:, 0] += run.D  # the skip D*u is the kernel's lag-0 tap
            conv, u_f_conj, K_f = causal_conv(u, K)
            self._cache = ConvSaved(saved, u.shape, run, Ct, u_f_conj, K_f)
            return np.ascontiguousarray(conv)
        if not self.runs_quant_scan:
            self._cache = ScanSaved(saved, u.shape, run, u)
            return scan(u, run.Abar, run.Bbar, run.C, run.D)
        x = self.state_quantizer
        state = StateQuant(None) if x is None else x.scan_scales(u, run.Abar, run.Bbar, self.clip, training)
        y, scan_cache = quant_scan(u, run.Abar, run.Bbar, run.C, run.D, state, self.clip)
        self._cache = QuantScanSaved(saved, u.shape, scan_cache)
        return y

    def backward(self, grad: np.ndarray, *, checked: bool = False) -> np.ndarray:
        """dL/dy (batch, length, d_model) -> dL/du; fills ``grads`` for the mode that ran forward."""
        saved = self._saved()
        g = grad if checked else check_grad_like("grad", grad, saved.shape)
        g = np.asarray(g, dtype=self.dtype)
        if isinstance(saved, ConvSaved):
            run = saved.run
            conv, dK = causal_conv_backward(g, saved.u_f_conj, saved.K_f)
            du = np.ascontiguousarray(conv)
            if self.q["u"] is not None:
                du = self.q["u"].backward(du)
            g_D = dK[:, 0]
            g_K = dK if self.q["K"] is None else self.q["K"].backward(dK)
            g_Ct, g_Abar = ssm_kernel_backward(g_K.astype(np.float64), saved.Ct, run.Abar)
            g_C = np.conj(run.Bbar) * g_Ct
            g_Bbar = np.conj(run.C) * g_Ct
        elif isinstance(saved, ScanSaved):
            run = saved.run
            du, g_Abar, g_Bbar, g_C = scan_backward(saved.u, g, run.Abar, run.Bbar, run.C, run.D)
            g_D = np.einsum("bth,bth->h", g, saved.u)
        else:
            sg = quant_scan_backward(g, saved.scan)
            du, g_Abar, g_Bbar, g_C, g_D = sg["u"], sg["Abar"], sg["Bbar"], sg["C"], sg["D"]
            if self.q["x"] is not None:
                self.q["x"].step_grad(sg["step"], 2 * saved.scan.u.size * (self.d_state // 2))
        grads = ssm_params_backward(self._params, self.abar, self.q, saved.params, g_Abar, g_Bbar, g_C, g_D)
        self._grads = {name: grads[name].astype(value.dtype) for name, value in self._params.items()}
        self._zero_unused_steps(saved.params.mode)
        return du

    def _zero_unused_steps(self, mode: str) -> None:
        """Zero gradients for the learned steps of the quantizers this mode does not run (conv: the
        state, Bbar, D and, for a continuous core, Abar; recurrent: K, u and A): they did not act on
        this output, but the optimizer needs an entry for every parameter, and a stale one must not
        be reapplied."""
        if mode == "conv":
            unused = ("x", "B", "D", "Abar") if self.abar == "continuous" else ("x", "B", "D")
        else:
            unused = ("K", "u", "A")
        for key in unused:
            q = self.q[key]
            if q is not None and q.scale_mode == "learned":
                q.zero_grads()

    # -- export and streaming ----------------------------------------------------------
    def export(self, calib: np.ndarray | None) -> dict[str, Any]:
        """The quantized tensors of the evaluation-mode recurrent core for the integer golden model:
        ``Abar``, ``Bbar``, ``C``, ``D`` (``QuantTensor`` or float arrays), ``state`` (the
        ``StateQuant`` or None) and ``clip``; see ``S4D.quantized_recurrent``. ``calib``: a
        (batch, L, d_model) input resolving an absmax state range (checked by the caller)."""
        eff = self.effective("recurrent")

        def codes(key: str, x: np.ndarray) -> Any:
            q = self.q[key]
            return x if q is None else q.quantize(x)

        x = self.state_quantizer
        data_range = x is not None and x.scale_mode == "absmax"
        state = None if x is None else x.scan_scales(calib if data_range else None, eff.Abar, eff.Bbar, self.clip)
        return {"Abar": codes("Abar", eff.Abar_float), "Bbar": codes("B", eff.Bbar_float),
                "C": codes("C", self._params["C"]), "D": codes("D", self._params["D"]),
                "state": state, "clip": self.clip}

    def frozen(self) -> CoreStep:
        """The evaluation-mode recurrent core frozen for streaming (``CoreStep``): the quantized Abar,
        Bbar, C, D, the state clip and the state quantizer's scales, derived once now. The state range
        must be static (the caller checks ``data_range_quantizer``). Forward caches are kept."""
        dtype = self.dtype
        run = self.effective("recurrent")
        clip = state = None
        if self.runs_quant_scan:
            clip = dtype.type(self.clip)
            x = self.state_quantizer
            if x is not None:
                state = x.frozen_parts(self.d_model, dtype)
        Abar, Bbar, C = (np.asarray(z, dtype=self.cdtype) for z in (run.Abar, run.Bbar, run.C))
        return CoreStep(Abar, Bbar, C, np.asarray(run.D, dtype=dtype), clip, state)

