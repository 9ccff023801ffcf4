"""The value-perturbation hook: what an op's forward computes with, perturbed per forward.

An op that supports the hook (``Linear``, the S4D core) has a public attribute
``perturbation`` (a ``ValuePerturbation`` or None, None by default). When it is set,
every forward hands the value it is about to compute with (a weight after its
quantizer, if any) to ``perturbation.perturb(key, value)`` and computes with the
returned array instead, and keeps that array for its backward. The perturbation is
an additive constant of that forward: the backward uses the perturbed value where
the forward did and passes the gradient through it unchanged (straight through),
so it reaches the parameter exactly as without the perturbation.

``key`` names the value inside the op (``"weight"`` for a Linear; ``"A"``,
``"Abar"``, ``"B"``, ``"C"``, ``"D"``, ``"dt"`` for the core, see
``qs4d_np.ssm.params``); ``wants(key)`` tells the op whether a value is perturbed
at all (the core then routes A through an explicit A before discretizing).
Inspection, export and streaming (``effective_ssm``, ``quantized_recurrent``,
``stream()``) read the clean values. The hook is set and cleared from outside
(``qs4d_np.hardware.noise.transient_noise``); nothing here draws.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ValuePerturbation(Protocol):
    """Replaces values a forward computes with (module docstring)."""

    def wants(self, key: str) -> bool:
        """Whether ``perturb(key, ...)`` changes the value (False: the op may skip the call)."""
        ...

    def perturb(self, key: str, value: np.ndarray) -> np.ndarray:
        """The value to compute with in place of ``value`` (a new array of the same shape and dtype;
        ``value`` itself is not modified). Called once per forward and key."""
        ...


def perturbed(perturbation: ValuePerturbation | None, key: str, value: np.ndarray) -> np.ndarray:
    """``value`` itself when ``perturbation`` is None or does not want ``key``, else its replacement."""
    if perturbation is None or not perturbation.wants(key):
        return value
    out = perturbation.perturb(key, value)
    if out.shape != value.shape or out.dtype != value.dtype:
        raise ValueError(f"perturbation of {key!r} returned shape {out.shape} dtype {out.dtype}, expected "
                         f"{value.shape} {value.dtype} (those of the value it replaces)")
    return out
