"""Compare an RTL dump directory against the expected vectors, word by word."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from qs4d_np.golden.vectors import load_vector_config, read_tensor

# Axis names of the output tensors, in file order.
AXES = {4: ("batch", "step", "channel", "mode"), 3: ("batch", "step", "channel")}


@dataclass(frozen=True)
class Mismatch:
    """One differing word: where it is, what was expected and what the RTL gave."""

    layer: int | None  # None: a model-level tensor (pooled sums, logits)
    tensor: str
    index: dict[str, int]
    expected: int
    got: int

    @property
    def diff_lsb(self) -> int:
        return self.got - self.expected

    def __str__(self) -> str:
        where = ", ".join(f"{k} {v}" for k, v in self.index.items())
        part = "model" if self.layer is None else f"layer {self.layer}"
        return (f"{part} {self.tensor} [{where}]: expected {self.expected}, "
                f"got {self.got} ({self.diff_lsb:+d} LSB)")


@dataclass
class CompareReport:
    words: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def __str__(self) -> str:
        head = f"{self.words - len(self.mismatches)} words agree, {len(self.mismatches)} differ"
        return "\n".join([head] + [str(m) for m in self.mismatches])

    def summary(self, show: int = 10) -> str:
        """Matching words, the first mismatch, mismatches per tensor and the first ``show`` of them."""
        lines = [f"{self.words - len(self.mismatches)} of {self.words} words match"]
        if self.ok:
            return lines[0] + ": the RTL agrees bit for bit"
        first = self.mismatches[0]
        lines.append(f"first mismatch: {first}")
        per_tensor: dict[str, int] = {}
        for m in self.mismatches:
            per_tensor[m.tensor] = per_tensor.get(m.tensor, 0) + 1
        lines.append("mismatches per tensor: " + ", ".join(f"{k} {v}" for k, v in per_tensor.items()))
        worst = max(abs(m.diff_lsb) for m in self.mismatches)
        lines.append(f"{len(self.mismatches)} word(s) differ, by up to {worst} LSB")
        lines += [f"  {m}" for m in self.mismatches[:show]]
        if len(self.mismatches) > show:
            lines.append(f"  ... and {len(self.mismatches) - show} more")
        return "\n".join(lines)


def compare_dumps(expected_dir: str | os.PathLike, rtl_dir: str | os.PathLike) -> CompareReport:
    """Every output word of ``expected_dir`` (per its manifest.json or config.json) against the same
    file in ``rtl_dir``.

    Malformed or truncated dumps raise ValueError naming the file and line
    (from ``read_memh``); differing words are listed, none is left out.
    """
    config = load_vector_config(expected_dir)
    report = CompareReport()
    for name, spec in config["tensors"].items():
        if not spec["output"]:
            continue
        want = read_tensor(expected_dir, name, spec)
        got = read_tensor(rtl_dir, name, spec)
        report.words += want.size
        for idx in np.argwhere(want != got):
            report.mismatches.append(Mismatch(
                layer=spec["layer"] if "layer" in spec else int(config["layer"]), tensor=name,
                index={axis: int(i) for axis, i in zip(spec.get("axes", AXES.get(want.ndim)), idx)},
                expected=int(want[tuple(idx)]), got=int(got[tuple(idx)])))
    return report
