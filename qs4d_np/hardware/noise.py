"""Gaussian weight noise on a model, applied in place and undone exactly.

What an analog array holds (and so what the noise reaches), per parameter name:

| target | parameters | perturbed quantity |
|---|---|---|
| ``A`` | ``*.ssm.log_A_real``, ``*.ssm.A_imag`` | Re(A) = -exp(log_A_real) and Im(A), separately |
| ``C`` | ``*.ssm.C`` | Re(C) and Im(C), separately |
| ``D`` | ``*.ssm.D`` | D |
| ``linear`` | ``*.mixing.linear.weight`` | the pointwise H -> 2H matrix |
| ``coder`` | ``encoder.weight``, ``decoder.weight`` | the encoder and decoder matrices |

Not perturbed: biases, norms (digital periphery) and ``log_dt`` (the step
size is folded into Abar = exp(dt*A); the noise on A already moves Abar).
Real and imaginary parts count as separate tensors because a crossbar holds
them in separate cells (the 2x2 real blocks of the IMSSA mapping); this is
also the QS4D protocol for A ("real and imaginary ranges separately").

The std of the noise on a tensor w is ``sigma * scale(w)`` with scale
"absmax" (max |w|, the crossbar's conductance full scale) or "range"
(max w - min w, the QS4D test-time protocol for A). A noisy Re(A) that would
reach >= 0 (an unstable, non-decaying mode) is held at ``-A_REAL_FLOOR``
times the tensor's largest |Re(A)|: the physical decay stays a decay.

Exactness: the original arrays are copied before the noise is added and
copied back into the same array objects on exit (also on an exception), so
an optimizer holding them sees the bit-exact original values. ``sigma = 0``
touches nothing and draws nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from qs4d_np.core.checks import check_choice, check_float
from qs4d_np.models.s4d_model import S4DModel

NOISE_TARGETS = ("A", "C", "D", "linear", "coder")
SCALES = ("absmax", "range")
# relative floor that keeps a perturbed Re(A) strictly negative (see the module docstring)
A_REAL_FLOOR = 1e-3


@dataclass(frozen=True)
class NoiseSite:
    """One real tensor the noise reaches: ``get()`` returns it in float64, ``put(v)`` writes it back."""

    name: str
    get: Callable[[], np.ndarray]
    put: Callable[[np.ndarray], None]
    owner: np.ndarray  # the parameter array that ``put`` modifies


def _target_of(name: str) -> str | None:
    parts = name.split(".")
    if parts[-2:] == ["linear", "weight"] and len(parts) >= 3 and parts[-3] == "mixing":
        return "linear"
    if name in ("encoder.weight", "decoder.weight"):
        return "coder"
    if len(parts) >= 2 and parts[-2] == "ssm":
        return {"log_A_real": "A", "A_imag": "A", "C": "C", "D": "D"}.get(parts[-1])
    return None


def _write(array: np.ndarray) -> Callable[[np.ndarray], None]:
    def put(value: np.ndarray) -> None:
        array[...] = value
    return put


def _sites_of(name: str, array: np.ndarray) -> list[NoiseSite]:
    if name.endswith("log_A_real"):
        def put_real(value: np.ndarray) -> None:
            magnitude = np.exp(array.astype(np.float64))  # the clean |Re(A)|: put runs once per get
            array[...] = np.log(np.maximum(-value, A_REAL_FLOOR * float(magnitude.max())))
        return [NoiseSite(name.replace("log_A_real", "Re(A)"), lambda: -np.exp(array.astype(np.float64)),
                          put_real, array)]
    if np.iscomplexobj(array):
        return [NoiseSite(f"Re({name})", lambda: array.real.astype(np.float64), _write(array.real), array),
                NoiseSite(f"Im({name})", lambda: array.imag.astype(np.float64), _write(array.imag), array)]
    return [NoiseSite(name, lambda: array.astype(np.float64), _write(array), array)]


def noise_sites(model: S4DModel, targets: Sequence[str] = NOISE_TARGETS) -> list[NoiseSite]:
    """The tensors of ``model`` (anything with a ``.params`` dict) that ``targets`` name, in ``.params`` order."""
    targets = tuple(targets)
    if not targets:
        raise ValueError(f"targets must name at least one of {list(NOISE_TARGETS)}, got {targets!r}")
    for t in targets:
        check_choice("targets entry", t, NOISE_TARGETS)
    params = getattr(model, "params", None)
    if not isinstance(params, dict):
        raise TypeError(f"model must have a .params dict of arrays, got {type(model).__name__}")
    sites = [site for name, array in params.items() if _target_of(name) in targets
             for site in _sites_of(name, array)]
    if not sites:
        raise ValueError(f"model has no parameters of targets {list(targets)} (names like 'layers.0.ssm.C', "
                         "'layers.0.ssm.mixing.linear.weight', 'encoder.weight')")
    return sites


def _scale(values: np.ndarray, scale: str) -> float:
    if scale == "range":
        return float(values.max() - values.min())
    return float(np.max(np.abs(values)))


@contextmanager
def perturbed(model: S4DModel, sigma: float, rng: np.random.Generator, *, targets: Sequence[str] = NOISE_TARGETS,
              scale: str = "absmax") -> Iterator[list[NoiseSite]]:
    """Add N(0, (sigma * scale(w))^2) to every tensor of ``targets`` for the duration of the block.

    One independent draw per element (in ``.params`` order, real part before
    imaginary part), from ``rng``. Yields the perturbed sites. On exit, every
    touched array gets its original contents back, bit for bit.
    """
    sigma = check_float("sigma", sigma, min_value=0.0)
    check_choice("scale", scale, SCALES)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    sites = noise_sites(model, targets)
    if sigma == 0.0:
        yield sites
        return
    saved: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    try:
        for site in sites:
            saved.setdefault(id(site.owner), (site.owner, site.owner.copy()))
            clean = site.get()
            noisy = clean + sigma * _scale(clean, scale) * rng.standard_normal(clean.shape)
            site.put(noisy)
        yield sites
    finally:
        for owner, original in saved.values():
            owner[...] = original


def weight_noise(model: S4DModel, sigma: float, rng: np.random.Generator):
    """Noise-aware training: every analog weight (all ``NOISE_TARGETS``) with std sigma * max|w|.

    Use around one forward + backward: ``with weight_noise(model, 0.05, rng):``
    ``logits = model.forward(x, training=True); model.backward(g)``, then step
    the optimizer outside the block, so the gradient taken at the noisy
    weights updates the clean ones. Raises ValueError for sigma < 0.
    """
    return perturbed(model, sigma, rng, targets=NOISE_TARGETS, scale="absmax")
