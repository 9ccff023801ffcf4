"""Test-time noise studies: accuracy of a model under noise, swept over noise levels and seeds.

Protocols (``PROTOCOLS``):

* ``"qs4d"`` and ``"absmax"``: transient Gaussian noise on the values the forward
  computes with (``qs4d_np.hardware.noise.transient_noise``; ``targets``, ``("A",)``
  by default: the reference's study), std sigma * (max - min) or sigma * max|w| of each
  real part, redrawn at every forward, i.e. for every batch. ``mode`` picks the
  forward (the model's own by default).
* ``"crossbar"``: the model run on crossbars (``qs4d_np.hardware.to_analog`` /
  ``evaluate_analog``, always recurrent) with transient read noise sigma at every MVM:
  ``read_noise`` "weight" sets ``w_noise = sigma`` (``"additive"``: a fresh N(0, sigma)
  weight perturbation, relative to g_max), "output" sets ``out_noise = sigma`` (added to
  every output, relative to the full-scale output), on top of ``base_config``
  (``CrossbarConfig.ideal()`` by default: ideal converters, no programming noise, so the
  read noise is the only effect), with converter ranges calibrated on ``calib`` (training
  sequences; None: the config's common ranges); it reaches every array, so ``targets``
  does not apply. The noise is multiplicative in the
  recurrence, so slowly decaying modes can grow; the state is clipped at
  ``state_bound`` (1e4 by default) and an overflowed sample counts as wrong.

A batch whose noisy forward goes non-finite (a noisy mode with |Abar| > 1 overflowing;
``noise`` leaves such values as drawn) counts as wrong for all its samples; the sweep
reports how many samples that was (``nonfinite``), so it is not silent.

Seeds: run s of a sweep uses ``np.random.default_rng([seed, s])``, the same stream for
every model and noise level, so the curves of different models see the same draws.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from qs4d_np.core.checks import (NonFiniteError, check_array, check_choice, check_float, check_int,
                                 check_sequence_input)
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.convert import evaluate_analog
from qs4d_np.hardware.noise import PROTOCOLS as VALUE_PROTOCOLS, noise_sites, transient_noise
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.ssm.s4d import MODES

PROTOCOLS = VALUE_PROTOCOLS + ("crossbar",)
READ_NOISES = ("weight", "output")


def _labels(model: S4DModel, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = check_sequence_input("x", x, model.d_input)
    y = check_array("y", y, ndim=1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) (one label per sequence of x), got {y.shape}")
    return x, y


def _check_protocol(model: S4DModel, protocol: str, targets: Sequence[str] | None,
                    mode: str | None) -> tuple[str, ...] | None:
    """The targets a protocol uses (None for crossbar), after checking them against ``model``."""
    check_choice("protocol", protocol, PROTOCOLS)
    if mode is not None:
        check_choice("mode", mode, MODES)
    if protocol == "crossbar":
        if targets is not None:
            raise ValueError(f"targets apply to the qs4d / absmax protocols; crossbar read noise reaches every "
                             f"array (got targets={targets!r})")
        if mode == "conv":
            raise ValueError("mode 'conv': the crossbar protocol runs the model recurrently (mode None or "
                             "'recurrent')")
        return None
    targets = ("A",) if targets is None else tuple(targets)
    noise_sites(model, targets)  # unknown targets, targets the model lacks, analog models
    return targets


@dataclass(frozen=True)
class CrossbarStudy:
    """The ``crossbar`` protocol's settings (module docstring; the keywords of ``noise_sweep``):
    ``base_config`` (None: ideal), ``calib`` (B, L, d_input) calibration sequences or None,
    ``read_noise`` (``READ_NOISES``), ``state_bound`` of the analog state registers."""

    base_config: CrossbarConfig | None = None
    calib: np.ndarray | None = None
    read_noise: str = "weight"
    state_bound: float | None = 1e4

    def __post_init__(self) -> None:
        check_choice("read_noise", self.read_noise, READ_NOISES)
        if self.base_config is not None and not isinstance(self.base_config, CrossbarConfig):
            raise TypeError(f"base_config must be a CrossbarConfig or None, got {type(self.base_config).__name__}")

    def check(self, protocol: str) -> None:
        """Crossbar settings given to another protocol are an error, not silently ignored."""
        if protocol != "crossbar" and (self.base_config is not None or self.calib is not None
                                       or self.read_noise != "weight"):
            raise ValueError(f"base_config, calib and read_noise apply to the crossbar protocol, not {protocol!r}")

    def config(self, sigma: float) -> CrossbarConfig:
        base = self.base_config if self.base_config is not None else CrossbarConfig.ideal()
        if self.read_noise == "output":
            return replace(base, out_noise=sigma)
        return replace(base, w_noise=sigma, w_noise_type="additive")


def _score(model: S4DModel, x: np.ndarray, y: np.ndarray, protocol: str, sigma: float,
           rng: np.random.Generator, targets: tuple[str, ...] | None, batch_size: int, mode: str | None,
           study: CrossbarStudy) -> tuple[float, int]:
    """(accuracy, samples lost to a non-finite forward or an overflowed analog state)."""
    if protocol == "crossbar":
        out = evaluate_analog(model, x, y, study.config(sigma), batch_size=batch_size,
                              seed=int(rng.integers(0, 2 ** 63)), state_bound=study.state_bound, calib=study.calib)
        return out["accuracy"], int(out["overflowed"])
    correct = lost = 0
    with transient_noise(model, sigma, rng, protocol, targets):  # type: ignore[arg-type]
        for lo in range(0, x.shape[0], batch_size):
            xb, yb = x[lo:lo + batch_size], y[lo:lo + batch_size]
            try:
                logits = model.forward(xb, training=False, mode=mode)
            except NonFiniteError:
                lost += len(yb)
                continue
            correct += int(np.count_nonzero(np.argmax(logits, axis=1) == yb))
    return correct / x.shape[0], lost


def accuracy_under_noise(model: S4DModel, x: np.ndarray, y: np.ndarray, protocol: str, sigma: float,
                         rng: np.random.Generator, *, targets: Sequence[str] | None = None, batch_size: int = 256,
                         mode: str | None = None, base_config: CrossbarConfig | None = None,
                         state_bound: float | None = 1e4, calib: np.ndarray | None = None,
                         read_noise: str = "weight") -> float:
    """Accuracy of ``model`` on (x, y) under ``protocol`` at level ``sigma`` (module docstring); ``targets``
    default to ("A",) for qs4d / absmax."""
    sigma = check_float("sigma", sigma, min_value=0.0)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    targets = _check_protocol(model, protocol, targets, mode)
    x, y = _labels(model, x, y)
    study = CrossbarStudy(base_config, calib, read_noise, state_bound)
    study.check(protocol)
    return _score(model, x, y, protocol, sigma, rng, targets, batch_size, mode, study)[0]


def noise_sweep(models: Mapping[str, S4DModel], x: np.ndarray, y: np.ndarray, protocol: str,
                sigmas: Sequence[float], *, targets: Sequence[str] | None = None, seeds: int = 5, seed: int = 0,
                batch_size: int = 256, mode: str | None = None, base_config: CrossbarConfig | None = None,
                state_bound: float | None = 1e4, calib: np.ndarray | None = None,
                read_noise: str = "weight") -> dict[str, dict[str, list]]:
    """Accuracy-vs-noise curves: for every model and sigma, ``seeds`` runs; mean and std over runs.

    Returns {name: {"sigma": [...], "mean": [...], "std": [...], "runs": [[acc per seed] per sigma],
    "nonfinite": [[samples lost per seed] per sigma]}} (std: population std over the seeds, ddof=0).
    Every model and target is checked before the first forward. Without noise (sigma 0 under
    qs4d / absmax nothing is drawn) the model runs once and that result counts for every run.
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty mapping name -> model")
    check_choice("protocol", protocol, PROTOCOLS)
    seeds = check_int("seeds", seeds, min_value=1)
    check_int("seed", seed, min_value=0)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    sigmas = [check_float(f"sigmas[{i}]", s, min_value=0.0) for i, s in enumerate(sigmas)]
    if not sigmas:
        raise ValueError("sigmas must hold at least one noise level")
    study = CrossbarStudy(base_config, calib, read_noise, state_bound)
    study.check(protocol)
    checked = {}
    for name, model in models.items():
        checked[name] = (_check_protocol(model, protocol, targets, mode), *_labels(model, x, y))
    out: dict[str, dict[str, list]] = {}
    for name, model in models.items():
        model_targets, xm, ym = checked[name]
        scores = []
        for s in sigmas:
            if s == 0.0 and protocol != "crossbar":  # no noise is drawn: every run gives the clean result
                scores.append([_score(model, xm, ym, protocol, s, np.random.default_rng([seed, 0]), model_targets,
                                      batch_size, mode, study)] * seeds)
                continue
            scores.append([_score(model, xm, ym, protocol, s, np.random.default_rng([seed, r]), model_targets,
                                  batch_size, mode, study) for r in range(seeds)])
        runs = [[acc for acc, _ in row] for row in scores]
        out[name] = {"sigma": list(sigmas), "mean": [float(np.mean(a)) for a in runs],
                     "std": [float(np.std(a)) for a in runs], "runs": runs,
                     "nonfinite": [[lost for _, lost in row] for row in scores]}
    return out


def sweep_records(sweep: Mapping[str, Mapping[str, list]], seed: int = 0) -> list[dict[str, Any]]:
    """``noise_sweep``'s result as flat records {checkpoint, sigma, seed, accuracy, nonfinite}, one per
    (model, sigma, run), in model, sigma, run order; ``seed`` is the sweep's, so run r reads as seed [seed, r]."""
    return [{"checkpoint": name, "sigma": s, "seed": r, "stream": [seed, r], "accuracy": acc,
             "nonfinite": curve["nonfinite"][i][r]}
            for name, curve in sweep.items() for i, s in enumerate(curve["sigma"])
            for r, acc in enumerate(curve["runs"][i])]
