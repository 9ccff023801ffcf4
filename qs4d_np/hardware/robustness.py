"""Test-time noise studies: accuracy of a model under noise, swept over noise levels and seeds.

Three kinds of noise (``KINDS``):

* ``"A"``: the QS4D protocol: Gaussian noise on Re(A) and Im(A) with std
  sigma times each part's value range (max - min), redrawn for every batch
  (every forward). Everything else stays clean.
* ``"weights"``: every analog weight (``qs4d_np.hardware.noise.NOISE_TARGETS``)
  with std sigma times its max |w|, redrawn for every batch.
* ``"read"``: the model run on crossbars (``qs4d_np.hardware.imssa``) with
  transient read noise: ``w_noise = sigma`` ("additive": a fresh N(0, sigma)
  weight perturbation, relative to g_max, at every MVM) on top of
  ``base_config`` (ideal converters and no programming noise by default, so
  the read noise is the only effect). The noise is multiplicative in the
  recurrence (absmax noise management scales it with the state), so slowly
  decaying modes can grow; the state is clipped at ``state_bound`` (1e4 by
  default, far above a working model's states) so that a diverging model
  shows up as lost accuracy instead of an overflow error.

Seeds: run s of a sweep uses ``np.random.default_rng([seed, s])``, the same
stream for every model and noise level, so the curves of different models see
the same noise draws.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np

from qs4d_np.core.checks import check_array, check_choice, check_float, check_int, check_sequence_input
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.convert import evaluate_analog
from qs4d_np.hardware.noise import NOISE_TARGETS, perturbed
from qs4d_np.models.s4d_model import S4DModel

KINDS = ("A", "weights", "read")


def _labels(model: S4DModel, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = check_sequence_input("x", x, model.d_input)
    y = check_array("y", y, ndim=1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) (one label per sequence of x), got {y.shape}")
    return x, y


def accuracy_under_noise(model: S4DModel, x: np.ndarray, y: np.ndarray, kind: str, sigma: float,
                         rng: np.random.Generator, *, batch_size: int = 256,
                         base_config: CrossbarConfig | None = None, state_bound: float | None = 1e4) -> float:
    """Accuracy of ``model`` on (x, y) with noise of ``kind`` at level ``sigma`` (module docstring)."""
    check_choice("kind", kind, KINDS)
    sigma = check_float("sigma", sigma, min_value=0.0)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    x, y = _labels(model, x, y)
    if kind == "read":
        cfg = replace(base_config if base_config is not None else CrossbarConfig.ideal(),
                      w_noise=sigma, w_noise_type="additive")
        seed = int(rng.integers(0, 2 ** 63))
        return evaluate_analog(model, x, y, cfg, batch_size=batch_size, seed=seed,
                               state_bound=state_bound)["accuracy"]
    targets, scale = (("A",), "range") if kind == "A" else (NOISE_TARGETS, "absmax")
    correct = 0
    for lo in range(0, x.shape[0], batch_size):
        with perturbed(model, sigma, rng, targets=targets, scale=scale):
            logits = model.forward(x[lo:lo + batch_size], training=False)
        correct += int(np.count_nonzero(np.argmax(logits, axis=1) == y[lo:lo + batch_size]))
    return correct / x.shape[0]


def noise_sweep(models: Mapping[str, S4DModel], x: np.ndarray, y: np.ndarray, kind: str, sigmas: Sequence[float], *,
                seeds: int = 5, seed: int = 0, batch_size: int = 256,
                base_config: CrossbarConfig | None = None, state_bound: float | None = 1e4
                ) -> dict[str, dict[str, list]]:
    """Accuracy-vs-noise curves: for every model and sigma, ``seeds`` runs; mean and std over runs.

    Returns {name: {"sigma": [...], "mean": [...], "std": [...], "runs": [[acc per seed] per sigma]}}
    (std is the population std over the seeds, ddof=0).
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty mapping name -> model")
    check_choice("kind", kind, KINDS)
    seeds = check_int("seeds", seeds, min_value=1)
    check_int("seed", seed, min_value=0)
    sigmas = [check_float(f"sigmas[{i}]", s, min_value=0.0) for i, s in enumerate(sigmas)]
    if not sigmas:
        raise ValueError("sigmas must hold at least one noise level")
    out: dict[str, dict[str, list]] = {}
    for name, model in models.items():
        runs = [[accuracy_under_noise(model, x, y, kind, s, np.random.default_rng([seed, r]),
                                      batch_size=batch_size, base_config=base_config, state_bound=state_bound)
                 for r in range(seeds)] for s in sigmas]
        out[name] = {"sigma": sigmas, "mean": [float(np.mean(a)) for a in runs],
                     "std": [float(np.std(a)) for a in runs], "runs": runs}
    return out
