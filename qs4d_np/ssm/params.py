"""The parameter path of one S4D core: its parameters -> the (quantized) Abar, Bbar, C, D it runs
with, and the way back for the gradients. Plain functions: ``S4DCore`` calls them.

Shapes: H channels, M = N/2 complex modes; Abar, Bbar, C (H, M) complex128 (C in the
layer's complex dtype), D (H,). By Abar parameterization (``abar``):

* ``continuous``: dt = exp(q_dt(log_dt)), A = -exp(log_A_real) + i*A_imag, then the
  discretization ``disc`` (``ssm.discretize``). Convolution mode with an ``A``
  quantizer discretizes the quantized A (the reference); recurrent mode quantizes the
  discrete Abar instead (``Abar`` quantizer, kept in the unit disk by ``abar_bound``).
* ``discrete``: Abar = exp(-softplus(Abar_rho) + i*Abar_theta) (``quant.discrete``),
  learned Bbar;
* ``frozen``: Abar a buffer, learned Bbar.

Then C through its quantizer (both modes), and in recurrent mode Bbar and D through
theirs (the convolution mode of the reference keeps them float). Every quantizer's
backward is its straight-through estimator; the gradients then chain through the
discretization exactly as in float (``ssm_params_backward``).

A ``perturbation`` (``core.perturb``; the forward's, None for inspection) replaces
values right after their quantizer (or where the quantizer would be), in this order
of the calls: ``dt`` (the quantized log_dt, so dt = exp(.) stays positive; continuous
only), ``A`` (conv mode, continuous: A after the A quantizer, before the
discretization; when A is perturbed but not quantized, A is formed explicitly and
discretized by ``discretize_dt_A``, the quantized-A route), ``Abar`` (after the Abar
quantizer: recurrent mode, and both modes of ``discrete`` / ``frozen``), ``C``, ``B``
(Bbar, after its quantizer in recurrent mode), ``D`` (after its quantizer in recurrent
mode). Its values are
constants of the forward: the backward sees the perturbed values where the forward
used them (the saved discretization, Abar, Bbar, C) and passes the gradient through
the perturbation unchanged to the quantizer's STE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from qs4d_np.core.perturb import ValuePerturbation, perturbed
from qs4d_np.quant.discrete import polar_abar, polar_backward
from qs4d_np.quant.quantizer import Quantizer
from qs4d_np.ssm.discretize import (DiscreteSSM, continuous_A, discretize, discretize_backward, discretize_dt_A,
                                     discretize_dt_A_backward)

# The quantizers of the parameter path, by key (child ``quant_<key>`` of the core).
PARAM_KEYS = ("A", "Abar", "B", "C", "D", "dt")


@dataclass(frozen=True)
class SSMParams:
    """The SSM parameters a forward computes with.

    ``Abar``, ``Bbar``, ``C``: (H, M) complex; ``D``: (H,). Quantized where the config
    quantizes them in that mode (fake-quant values), float otherwise. ``Abar_float``,
    ``Bbar_float``: (H, M) complex128, the values before the Abar / Bbar quantizers (after
    a quantized dt or A, if any).
    """

    Abar: np.ndarray
    Bbar: np.ndarray
    C: np.ndarray
    D: np.ndarray
    Abar_float: np.ndarray
    Bbar_float: np.ndarray


@dataclass(frozen=True)
class ParamsSaved:
    """What ``ssm_params_backward`` needs from ``ssm_params``: the mode, the discretization
    (continuous; None otherwise), whether A was formed explicitly (quantized or perturbed) before
    discretizing, and the
    float Abar before its quantizer (kept in every case; the polar backward of a ``discrete``
    parameterization reads it)."""

    mode: str
    d: DiscreteSSM | None
    A_explicit: bool
    Abar_float: np.ndarray


def _through(q: Quantizer | None, x: np.ndarray, training: bool) -> np.ndarray:
    return x if q is None else q.forward(x, training=training)


def _back(q: Quantizer | None, g: np.ndarray) -> np.ndarray:
    return g if q is None else q.backward(g)


def float_abar(p: Mapping[str, np.ndarray], buffers: Mapping[str, np.ndarray], abar: str) -> np.ndarray:
    """The float Abar (H, M) complex128 of a ``discrete`` or ``frozen`` parameterization."""
    if abar == "discrete":
        return polar_abar(p["Abar_rho"], p["Abar_theta"])
    return buffers["Abar"].astype(np.complex128)


def float_discrete(p: Mapping[str, np.ndarray], buffers: Mapping[str, np.ndarray], abar: str,
                   disc: str) -> DiscreteSSM:
    """The float (Abar, Bbar) and intermediates, complex128, without any quantizer. For ``discrete`` /
    ``frozen`` only ``Abar`` and ``Bbar`` (= ``Bbar0``) are set; ``dt`` and ``A`` are None."""
    if abar != "continuous":
        Bbar = p["Bbar"].astype(np.complex128)
        return DiscreteSSM(abar, None, None, float_abar(p, buffers, abar), Bbar, Bbar)  # type: ignore[arg-type]
    return discretize(p["log_dt"], p["log_A_real"], p["A_imag"], p.get("B"), disc)


def ssm_params(p: Mapping[str, np.ndarray], buffers: Mapping[str, np.ndarray], abar: str, disc: str,
               q: Mapping[str, Quantizer | None], training: bool, mode: str,
               perturbation: ValuePerturbation | None = None) -> tuple[SSMParams, ParamsSaved]:
    """The parameters the core runs with in ``mode`` (module docstring), and the backward's context.

    ``p``: the core's parameters; ``buffers``: its buffers (``Abar`` when frozen); ``q``: the
    quantizer of each of ``PARAM_KEYS`` or None; ``perturbation``: replaces values of one forward
    (module docstring) or None.
    """
    recurrent = mode == "recurrent"

    def through(key: str, x: np.ndarray) -> np.ndarray:  # quantizer, then the forward's perturbation
        return perturbed(perturbation, key, _through(q[key], x, training))

    d, A_explicit = None, False
    if abar == "continuous":
        log_dt = through("dt", p["log_dt"])
        A_explicit = not recurrent and (q["A"] is not None or (perturbation is not None and perturbation.wants("A")))
        if not A_explicit:
            d = discretize(log_dt, p["log_A_real"], p["A_imag"], p.get("B"), disc)
            Abar = through("Abar", d.Abar) if recurrent else d.Abar
        else:  # the reference: quantize A itself, then discretize
            A = through("A", continuous_A(p["log_A_real"], p["A_imag"]))
            d = discretize_dt_A(np.exp(log_dt.astype(np.float64)), A, p.get("B"), disc)
            Abar = d.Abar
        Abar_float, Bbar = d.Abar, d.Bbar
    else:
        Abar_float = float_abar(p, buffers, abar)
        Abar = through("Abar", Abar_float)
        Bbar = p["Bbar"].astype(np.complex128)
    Bbar_float = Bbar
    C, D = through("C", p["C"]), p["D"]
    if recurrent:
        Bbar = through("B", Bbar)
        D = through("D", D)
    else:  # the convolution mode keeps Bbar and D float (no quantizer); a perturbation still applies
        Bbar = perturbed(perturbation, "B", Bbar)
        D = perturbed(perturbation, "D", D)
    return SSMParams(Abar, Bbar, C, D, Abar_float, Bbar_float), ParamsSaved(mode, d, A_explicit, Abar_float)


def ssm_params_backward(p: Mapping[str, np.ndarray], abar: str, q: Mapping[str, Quantizer | None],
                        saved: ParamsSaved, g_Abar: np.ndarray, g_Bbar: np.ndarray, g_C: np.ndarray,
                        g_D: np.ndarray) -> dict[str, np.ndarray]:
    """Chain the core's gradients w.r.t. (Abar, Bbar, C, D) through the quantizers and the
    discretization to the parameters of ``p`` (float64 / complex128; the caller casts)."""
    if saved.mode == "recurrent":
        g_Bbar = _back(q["B"], g_Bbar)
        g_D = _back(q["D"], g_D)
    grads = {"C": _back(q["C"], g_C), "D": g_D}
    if abar == "continuous":
        d = saved.d
        if saved.A_explicit:
            g_dt, g_A, g_B = discretize_dt_A_backward(d, p.get("B"), g_Abar, g_Bbar)
            g_A = _back(q["A"], g_A)
            grads["log_A_real"] = np.real(g_A) * -np.exp(p["log_A_real"].astype(np.float64))
            grads["A_imag"] = np.imag(g_A)
            grads["log_dt"] = g_dt * d.dt[:, 0]
            if g_B is not None:
                grads["B"] = g_B
        else:
            if saved.mode == "recurrent":
                g_Abar = _back(q["Abar"], g_Abar)
            grads.update(discretize_backward(d, p.get("B"), g_Abar, g_Bbar))
        grads["log_dt"] = _back(q["dt"], grads["log_dt"])
    else:
        g_Abar = _back(q["Abar"], g_Abar)  # also the learned step's gradient when frozen
        if abar == "discrete":
            grads["Abar_rho"], grads["Abar_theta"] = polar_backward(p["Abar_rho"], saved.Abar_float, g_Abar)
        grads["Bbar"] = g_Bbar
    return grads
