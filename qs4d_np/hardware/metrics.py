"""Hardware cost metrics of a (quantized) S4D model: the QS4D formulas and datapath counts.

The QS4D reference (SPEC.md section 2) scores a model with three formulas in
the bit widths r_X of its quantization targets, with N = d_state counted as
reals, H = width and L = layers:

* ACE (arithmetic complexity): per layer
  H*(N*r_A*r_state*r_dt + N*r_B*r_act + N*r_C*r_state) + H*H*r_act*r_lin
  (r_B = 0 for S4D), total = L*per_layer + H*d_in*r_coder*r_act
  + H*d_out*r_coder*r_act. An older variant leaves r_dt out of the first term.
* model size (bits): N*H*L*r_A + N*H*L*r_C + H*H*L*r_lin + H*d_in*r_coder
  + decoder. The reference writes the decoder as H*d_in*r_coder, a bug kept
  under ``compat="qs4d"``; the default counts H*d_out*r_coder.
* ADC complexity: (N*r_state + r_act)*H*L + H*r_lin*L + H*r_act + d_out*r_act.

The reference's logged values (N = H = 128, 4 layers, d_in = 1, d_out = 10,
every r = 12) are ACE 132,323,328 (28,514,304 without r_dt), model size
2,362,368 bits and ADC 800,376. They need N = 128, and only N = 128 gives
them (ACE grows strictly with N), while the paper's model has d_state = 64:
the logged figures describe N = 128 (a run with d_state = 128, or N taken as
2 * d_state), not N = 64. Pass the N you mean; ``tests/test_metrics.py`` pins
the four values.

``count_datapath`` is the extension point for the figures counted from a
model's actual integer datapath (MACs by operand widths, bits stored, ADC
conversions x bits, pruned rows/columns removed): it counts a list of
``MatVecOp``; ``qs4d_np.hardware.datapath`` produces that list from a model.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable

from qs4d_np.core.checks import check_choice, check_int

COMPAT = ("corrected", "qs4d")
FLOAT_BITS = 32


@dataclass(frozen=True)
class SSMShape:
    """What the formulas need of a model: N (d_state, reals), H, layers, d_in, d_out."""

    N: int
    H: int
    layers: int
    d_in: int
    d_out: int

    def __post_init__(self) -> None:
        for name in ("N", "H", "layers", "d_in", "d_out"):
            check_int(f"SSMShape.{name}", getattr(self, name), min_value=1)


@dataclass(frozen=True)
class BitWidths:
    """Bits r_X per quantization target (SPEC.md section 2's names).

    ``B`` is 0 for S4D, whose B is fixed and folded into C; give it bits only
    for a model that trains B. ``D`` (the skip) is in no formula; the datapath
    counts use it.
    """

    A: int = FLOAT_BITS
    C: int = FLOAT_BITS
    dt: int = FLOAT_BITS
    state: int = FLOAT_BITS
    act: int = FLOAT_BITS
    lin: int = FLOAT_BITS
    coder: int = FLOAT_BITS
    B: int = 0
    D: int = FLOAT_BITS

    def __post_init__(self) -> None:
        for name in ("A", "C", "dt", "state", "act", "lin", "coder", "D"):
            check_int(f"BitWidths.{name}", getattr(self, name), min_value=1)
        check_int("BitWidths.B", self.B, min_value=0)

    @classmethod
    def uniform(cls, bits: int, B: int = 0) -> "BitWidths":
        """The same width for every target (B stays 0 unless given)."""
        return cls(A=bits, C=bits, dt=bits, state=bits, act=bits, lin=bits, coder=bits, B=B, D=bits)

    @classmethod
    def float32(cls) -> "BitWidths":
        """The float baseline: 32 bits everywhere."""
        return cls.uniform(FLOAT_BITS)


def ace(shape: SSMShape, r: BitWidths, with_dt: bool = True) -> int:
    """Arithmetic complexity (bit-weighted operation count) of the whole model."""
    N, H = shape.N, shape.H
    r_dt = r.dt if with_dt else 1
    per_layer = H * (N * r.A * r.state * r_dt + N * r.B * r.act + N * r.C * r.state) + H * H * r.act * r.lin
    return shape.layers * per_layer + H * shape.d_in * r.coder * r.act + H * shape.d_out * r.coder * r.act


def model_size_bits(shape: SSMShape, r: BitWidths, compat: str = "corrected") -> int:
    """Bits of the stored parameters; ``compat="qs4d"`` keeps the reference's decoder term."""
    check_choice("compat", compat, COMPAT)
    N, H, L = shape.N, shape.H, shape.layers
    decoder_width = shape.d_in if compat == "qs4d" else shape.d_out
    return (N * H * L * r.A + N * H * L * r.C + H * H * L * r.lin
            + H * shape.d_in * r.coder + H * decoder_width * r.coder)


def adc_complexity(shape: SSMShape, r: BitWidths) -> int:
    """Bits converted by the ADCs per time step."""
    N, H, L = shape.N, shape.H, shape.layers
    return (N * r.state + r.act) * H * L + H * r.lin * L + H * r.act + shape.d_out * r.act


@dataclass(frozen=True)
class CostReport:
    ace: int
    ace_without_dt: int
    model_size_bits: int
    adc: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def cost_report(shape: SSMShape, r: BitWidths, compat: str = "corrected") -> CostReport:
    """All QS4D figures for one bit assignment."""
    return CostReport(ace(shape, r), ace(shape, r, with_dt=False), model_size_bits(shape, r, compat),
                      adc_complexity(shape, r))


def reductions(shape: SSMShape, r: BitWidths, baseline: BitWidths | None = None,
               compat: str = "corrected") -> dict[str, float]:
    """Reduction factors baseline / quantized (float32 baseline by default), like the paper's figure."""
    return {name: row["reduction"] for name, row in summary(shape, r, baseline, compat).items()}


def summary(shape: SSMShape, r: BitWidths, baseline: BitWidths | None = None,
            compat: str = "corrected") -> dict[str, dict[str, float]]:
    """JSON-ready table: per figure the baseline (float32 by default), the quantized value and the reduction."""
    base = cost_report(shape, baseline if baseline is not None else BitWidths.float32(), compat).to_dict()
    quant = cost_report(shape, r, compat).to_dict()
    return {name: {"baseline": base[name], "quantized": quant[name], "reduction": base[name] / quant[name]}
            for name in base}


# -- counted from a datapath -------------------------------------------------
@dataclass(frozen=True)
class MatVecOp:
    """One matrix-vector product of a datapath, run ``calls`` times per sample.

    ``rows`` inputs x ``cols`` outputs, of which ``active_rows`` / ``active_cols``
    survive pruning (default: all). Weights have ``weight_bits``, inputs
    ``input_bits``; every active output is converted once per call with
    ``output_bits`` (0 for a digital op without an ADC). ``copies``: the op is
    that many independent blocks of this shape (a block diagonal, e.g. one
    2x2 Abar block per SSM mode); every count is multiplied by it.
    """

    name: str
    rows: int
    cols: int
    weight_bits: int
    input_bits: int
    output_bits: int
    calls: int = 1
    active_rows: int | None = None
    active_cols: int | None = None
    copies: int = 1

    def __post_init__(self) -> None:
        for key in ("rows", "cols", "weight_bits", "input_bits", "calls", "copies"):
            check_int(f"MatVecOp({self.name!r}).{key}", getattr(self, key), min_value=1)
        check_int(f"MatVecOp({self.name!r}).output_bits", self.output_bits, min_value=0)
        if self.active_rows is not None:
            check_int(f"MatVecOp({self.name!r}).active_rows", self.active_rows, min_value=0, max_value=self.rows)
        if self.active_cols is not None:
            check_int(f"MatVecOp({self.name!r}).active_cols", self.active_cols, min_value=0, max_value=self.cols)


@dataclass
class DatapathCounts:
    """Totals per sample: MACs keyed by (weight_bits, input_bits), bits stored, ADC conversions and bits."""

    macs: Counter = field(default_factory=Counter)
    bits_stored: int = 0
    adc_conversions: int = 0
    adc_bits: int = 0

    @property
    def bit_ops(self) -> int:
        """sum of MACs x weight bits x input bits (the datapath's analogue of ACE)."""
        return sum(n * wb * ib for (wb, ib), n in self.macs.items())


def count_datapath(ops: Iterable[MatVecOp]) -> DatapathCounts:
    """Count MACs, stored bits and ADC work of a list of matrix-vector products."""
    counts = DatapathCounts()
    for op in ops:
        if not isinstance(op, MatVecOp):
            raise TypeError(f"count_datapath needs MatVecOp entries, got {type(op).__name__}")
        rows = op.rows if op.active_rows is None else op.active_rows
        cols = op.cols if op.active_cols is None else op.active_cols
        cells = rows * cols * op.copies
        counts.macs[(op.weight_bits, op.input_bits)] += cells * op.calls
        counts.bits_stored += cells * op.weight_bits
        if op.output_bits:
            counts.adc_conversions += cols * op.copies * op.calls
            counts.adc_bits += cols * op.copies * op.calls * op.output_bits
    return counts
