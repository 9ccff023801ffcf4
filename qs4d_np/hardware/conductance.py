"""Weights to differential-pair conductances: mapping, levels, programming noise, IR drop.

Conductances are normalized, g / g_max, so a weight of magnitude max|W| maps
to 1; arrays are kept in level units (see ``Conductances``).

Mapping (one absmax scale per tensor): g+ = clamp(W/max|W|, 0, 1),
g- = clamp(-W/max|W|, 0, 1). With ``g_levels`` = L the targets are rounded
(half to even) to the L levels k/(L-1), k = 0..L-1.

Programming noise is drawn once per device when the array is programmed and
added to the target; the result is clamped at 0 (a conductance cannot be
negative; overshooting g_max is allowed). PCM model (SPEC.md section 4), in
units of g_max: sigma(g) = prog_noise/25 * (c0 + c1*g + c2*g^2). Gaussian model:
sigma = prog_noise.

IR drop (ours). A tile is drawn with the inputs driving word lines (rows,
driver left of column 0) and each output's pair on two bit lines (physical
columns 2i for g+ and 2i+1 for g-), read by a virtual-ground ADC below the last
row. Every wire segment (also the ones to the driver and to the ADC) has
resistance r, and ``ir_drop`` = rho = r * g_max. Linear devices make the array
a linear network, so the IR drop is a fixed, input-independent distortion of
the weights; to first order in rho each conductance is scaled by

    1 - rho * (c_ji + e_ji),
    c_ji = sum_i' g_ji' * (min(i, i') + 1)     (word line: the current of the
           cells at and beyond column i flows through the segments before it)
    e_ji = sum_j' g_j'i * (n - max(j, j'))     (bit line: the current of the
           cells at and above row j flows through the segments below it)

with j, j' rows, i, i' physical columns and n rows. The error is O(rho^2);
``reference.crossbar.ir_drop_exact`` solves the full network to check it.

Drift (PCM, SPEC.md section 4; drawn once, after programming noise, when
``t_inference`` > 0): each device's conductance becomes g * ((t + t0)/t0)^-nu
with t0 = 20 s and its own exponent nu = |N(mu(g), s(g))|, then accumulated 1/f
read noise g += |g| * q(g) * sqrt(ln((t + t_read)/(2 t_read))) * N(0, 1), clamped
at 0 (g: the programmed value in units of g_max). Global drift compensation
scales an array's outputs by one factor: its mean |output| for an all-ones
read-out input right after programming over the same at t.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qs4d_np.core.checks import check_array
from qs4d_np.hardware.config import CrossbarConfig

# beyond this attenuation the first-order IR-drop model is no longer trustworthy
MAX_IR_ATTENUATION = 0.5
# PCM drift (aihwkit's PCMLikeNoiseModel, SPEC.md section 4)
DRIFT_T0 = 20.0
READ_T = 250e-9


@dataclass(frozen=True)
class Conductances:
    """Programmed pair conductances (out, in) in level units: g / g_max = level * g_unit.

    With ``g_levels`` = L, g_unit = 1/(L-1) and noise-free levels are exact
    integers 0..L-1 (so noise-free column sums are exact); without levels
    g_unit = 1 and the arrays hold g / g_max.
    """

    g_pos: np.ndarray
    g_neg: np.ndarray
    g_unit: float
    w_absmax: float

    @property
    def weights(self) -> np.ndarray:
        """The weight matrix the conductances realise, in the units of W."""
        return (self.g_pos - self.g_neg) * self.g_unit * self.w_absmax


def target_conductances(W: np.ndarray, config: CrossbarConfig) -> Conductances:
    """Noise-free pair targets for W (out, in), rounded to ``g_levels`` if set."""
    W = check_array("W", W, ndim=2, min_size=1)
    W = W.astype(np.float64)
    w_absmax = float(np.max(np.abs(W)))
    # an all-zero matrix maps to zero conductances; any positive scale does
    w_absmax = w_absmax if w_absmax > 0 else 1.0
    g_pos = np.clip(W / w_absmax, 0.0, 1.0)
    g_neg = np.clip(-W / w_absmax, 0.0, 1.0)
    if config.g_levels is None:
        return Conductances(g_pos, g_neg, 1.0, w_absmax)
    top = config.g_levels - 1
    return Conductances(np.rint(g_pos * top), np.rint(g_neg * top), 1.0 / top, w_absmax)


def programming_sigma(g: np.ndarray, config: CrossbarConfig) -> np.ndarray:
    """Std of the programming noise for normalized target conductances g (units of g_max)."""
    if config.prog_noise_type == "gaussian":
        return np.full_like(g, config.prog_noise)
    c0, c1, c2 = config.pcm_coeffs
    return config.prog_noise / 25.0 * (c0 + c1 * g + c2 * g * g)


def program_conductances(W: np.ndarray, config: CrossbarConfig,
                         rng: np.random.Generator) -> Conductances:
    """Targets plus programming noise drawn once from ``rng`` (shape (2, out, in): g+ then g-)."""
    target = target_conductances(W, config)
    if config.prog_noise == 0.0:
        return target
    unit = target.g_unit
    z = rng.standard_normal((2,) + target.g_pos.shape)
    noisy = [np.maximum(g + programming_sigma(g * unit, config) / unit * zi, 0.0)
             for g, zi in ((target.g_pos, z[0]), (target.g_neg, z[1]))]
    return Conductances(noisy[0], noisy[1], unit, target.w_absmax)


def pair_layout(g_pos: np.ndarray, g_neg: np.ndarray) -> np.ndarray:
    """(out, in) pair conductances -> the physical tile (in, 2*out), columns g+_0, g-_0, g+_1, ..."""
    phys = np.empty((g_pos.shape[1], 2 * g_pos.shape[0]), dtype=np.float64)
    phys[:, 0::2] = g_pos.T
    phys[:, 1::2] = g_neg.T
    return phys


def ir_drop_attenuation(g_phys: np.ndarray, rho: float) -> np.ndarray:
    """First-order IR-drop factors 1 - rho*(c + e) for a physical tile (rows, columns)."""
    n = g_phys.shape[0]
    # c_ji = sum_{k<=i} S_jk with S_jk = sum_{i'>=k} g_ji' (current through word-line segment k)
    suffix = np.cumsum(g_phys[:, ::-1], axis=1)[:, ::-1]
    c = np.cumsum(suffix, axis=1)
    # e_ji = sum_{s>=j} P_si with P_si = sum_{j'<=s} g_j'i (current through bit-line segment s)
    prefix = np.cumsum(g_phys, axis=0)
    e = np.cumsum(prefix[::-1], axis=0)[::-1]
    factor = 1.0 - rho * (c + e)
    worst = float(1.0 - factor.min()) if factor.size else 0.0
    if worst > MAX_IR_ATTENUATION:
        raise ValueError(
            f"CrossbarConfig.ir_drop = {rho} attenuates a cell of a {n} x {g_phys.shape[1]} tile by "
            f"{worst:.3f} > {MAX_IR_ATTENUATION}; the first-order IR-drop model does not hold there "
            "(use a smaller ir_drop or smaller tiles)")
    return factor


def apply_ir_drop(g_pos: np.ndarray, g_neg: np.ndarray, g_unit: float,
                  rho: float) -> tuple[np.ndarray, np.ndarray]:
    """Effective (g+, g-) of one tile (out, in, level units) after first-order IR drop."""
    factor = ir_drop_attenuation(pair_layout(g_pos * g_unit, g_neg * g_unit), rho)
    return g_pos * factor[:, 0::2].T, g_neg * factor[:, 1::2].T


def drift_exponents(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-device drift exponents nu = |N(mu(g), s(g))| for programmed conductances g (units of g_max)."""
    with np.errstate(divide="ignore"):
        log_g = np.log(np.maximum(g, 0.0))  # g = 0: mu and s take their clamped end values
    mu = np.clip(-0.0155 * log_g + 0.0244, 0.049, 0.1)
    s = np.clip(-0.0125 * log_g - 0.0059, 0.008, 0.045)
    return np.abs(mu + s * rng.standard_normal(g.shape))


def drift_conductances(g_pos: np.ndarray, g_neg: np.ndarray, g_unit: float, config: CrossbarConfig,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(g+, g-) in level units ``t_inference`` seconds after programming (module docstring); the
    arrays themselves, and nothing drawn, when t_inference is 0. Draws, in order, the exponents
    of g+ then g-, then the read noise of g+ then g-."""
    t = config.t_inference
    if t == 0.0:
        return g_pos, g_neg
    programmed = [g * g_unit for g in (g_pos, g_neg)]
    nu = [drift_exponents(g, rng) for g in programmed]
    decayed = [g * ((t + DRIFT_T0) / DRIFT_T0) ** -n for g, n in zip(programmed, nu)]
    spread = np.sqrt(np.log((t + READ_T) / (2 * READ_T)))
    out = []
    for g0, g in zip(programmed, decayed):
        q = np.minimum(0.0088 / np.maximum(np.abs(g0) ** 0.65, 1e-3), 0.2)
        out.append(np.maximum(g + np.abs(g) * q * spread * rng.standard_normal(g.shape), 0.0) / g_unit)
    return out[0], out[1]


def drift_compensation(before: np.ndarray, after: np.ndarray) -> float:
    """Global drift compensation: mean |output| of the read-out input before drift over after (1 when
    either is 0: nothing to compare)."""
    a, b = float(np.mean(np.abs(before))), float(np.mean(np.abs(after)))
    return a / b if a > 0 and b > 0 else 1.0
