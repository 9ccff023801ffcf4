"""Seeded random SSM-core configurations for the golden and RTL tests.

Weights and inputs are drawn on their grids with a chosen share of words at
the grid edges (qmin, qmax); the scales are log-uniform around values that
keep the recurrence near |Abar| ~ 1 and the outputs near the grid edges, so
saturation happens in a good share of the runs.
"""
from __future__ import annotations

import numpy as np

from qs4d_np.core.checks import check_choice, check_float, check_int
from qs4d_np.golden.fixedpoint import IntFormat
from qs4d_np.golden.layer import WEIGHT_FORMAT, SSMCore, SSMCoreFormats
from qs4d_np.golden.multiplier import ssm_core_multipliers

TENSORS = ("u", "Abar", "Bbar", "C", "D", "x", "y")


def grid_values(rng: np.random.Generator, fmt: IntFormat, shape: tuple[int, ...],
                edge: float) -> np.ndarray:
    """int64 values on ``fmt``'s grid; a share ``edge`` of them at qmin or qmax."""
    values = rng.integers(fmt.qmin, fmt.qmax + 1, size=shape, dtype=np.int64)
    at_edge = rng.random(shape) < edge
    return np.where(at_edge, np.where(rng.random(shape) < 0.5, fmt.qmin, fmt.qmax), values)


def random_ssm_case(seed: int | np.random.Generator, widths: dict[str, int], *, H: int, N2: int,
                    batch: int, length: int, edge: float = 0.2, grid: str = "full",
                    dyadic: bool = False) -> tuple[SSMCore, np.ndarray]:
    """A random core and input ``u`` (batch, length, H).

    ``widths`` maps each of u, Abar, Bbar, C, D, x, y to a width; ``grid`` is
    "full" (every word of the width) or "qs4d" (the symmetric grid with
    2**(width-1) states, [-2**(width-2), 2**(width-2)]). ``dyadic`` makes every
    scale a power of two, as with power-of-two quantizer scales: then exact
    ties (remainder = one half) are frequent, which exercises the tie rule.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if sorted(widths) != sorted(TENSORS):
        raise ValueError(f"widths must name exactly {list(TENSORS)}, got {sorted(widths)}")
    check_choice("grid", grid, ["full", "qs4d"])
    edge = check_float("edge", edge, min_value=0.0, max_value=1.0)
    for name, value in (("H", H), ("N2", N2), ("batch", batch), ("length", length)):
        check_int(name, value, min_value=1)
    make = IntFormat.full if grid == "full" else (lambda w: IntFormat.qs4d(1 << (w - 1), w))
    formats = SSMCoreFormats(**{k: make(widths[k]) for k in TENSORS})
    weights = {name: grid_values(rng, getattr(formats, fmt), (H,) if name == "D" else (H, N2), edge)
               for name, fmt in WEIGHT_FORMAT.items()}
    u = grid_values(rng, formats.u, (batch, length, H), edge)

    def log_uniform(center: float, shape: tuple[int, ...], spread: float = 1.5) -> np.ndarray:
        exponent = np.log2(center) + rng.uniform(-spread, spread, size=shape)
        return 2.0 ** (np.round(exponent) if dyadic else exponent)

    # Real values are step * integer with s_u = s_y = 1 and state steps near 1,
    # so the state multipliers are about the Abar / Bbar steps; |Abar| spans
    # about 0.4..1.7, so some runs decay and some grow into saturation.
    ones = np.ones(H)
    mults = ssm_core_multipliers(
        formats, s_u=ones, s_y=ones, H=H, N2=N2, s_x_re=log_uniform(1.0, (H,), spread=0.5),
        s_x_im=log_uniform(1.0, (H,), spread=0.5),
        s_Abar_re=log_uniform(0.7 / formats.Abar.maxabs, (H, N2), spread=0.75),
        s_Abar_im=log_uniform(0.7 / formats.Abar.maxabs, (H, N2), spread=0.75),
        s_Bbar_re=log_uniform(formats.x.maxabs / (4.0 * formats.Bbar.maxabs * formats.u.maxabs), (H, N2)),
        s_Bbar_im=log_uniform(formats.x.maxabs / (4.0 * formats.Bbar.maxabs * formats.u.maxabs), (H, N2)),
        s_C_re=log_uniform(formats.y.maxabs / (2.0 * N2 * formats.C.maxabs * formats.x.maxabs), (H,)),
        s_C_im=log_uniform(formats.y.maxabs / (2.0 * N2 * formats.C.maxabs * formats.x.maxabs), (H,)),
        s_D=log_uniform(formats.y.maxabs / (2.0 * formats.D.maxabs * formats.u.maxabs), (H,)))
    return SSMCore(formats, **weights, **mults), u
