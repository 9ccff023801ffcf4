"""Compare an RTL dump directory against the expected vectors, word by word.

Mismatches are listed in **dataflow order**, so the first one is where a fault entered: by
sample, then step, then layer, then the tensor's place in the step (u -> x_re -> x_im -> y ->
za -> zb -> sig -> act -> out, each followed by its saturation flags), then channel and mode;
the model-level tensors (pooled, avg, logits, predictions) come after every step of their
sample. A bundle's stress sub-bundle (``stress/``) is compared after the bundle itself.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qs4d_np.golden.model import LAYER_TENSORS
from qs4d_np.golden.vectors import load_vector_config, read_tensor

# Axis names of the output tensors, in file order.
AXES = {4: ("batch", "step", "channel", "mode"), 3: ("batch", "step", "channel")}
# Place of each tensor within a step, then of the model-level tensors after the last step.
ORDER = {name: i for i, name in enumerate(
    [n for t in LAYER_TENSORS for n in (t, "sat_" + t)] + ["pooled", "avg", "logits", "predictions"])}


@dataclass(frozen=True)
class Mismatch:
    """One differing word: where it is, what was expected and what the RTL gave."""

    layer: int | None  # None: a model-level tensor (pooled sums, logits)
    tensor: str
    index: dict[str, int]
    expected: int
    got: int

    def order(self) -> tuple:
        """Sort key of the dataflow order (module doc)."""
        idx = self.index
        sample = idx.get("sample", idx.get("batch", 0))
        leaf = self.tensor.rsplit(".", 1)[-1]
        step = idx["step"] if "step" in idx else float("inf")
        layer = -1 if self.layer is None else self.layer
        rest = tuple(v for k, v in idx.items() if k not in ("sample", "batch", "step"))
        return (self.tensor.startswith("stress/"), sample, step, layer, ORDER.get(leaf, len(ORDER)), rest)

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


def compare_dumps(expected_dir: str | os.PathLike, rtl_dir: str | os.PathLike, only: str | None = None
                  ) -> CompareReport:
    """Every output word of ``expected_dir`` (per its manifest.json or config.json) against the same
    file in ``rtl_dir``; mismatches in dataflow order (module doc).

    ``only``: a shell pattern (``fnmatch``) on the tensor names, e.g. ``layers.0.*`` (one layer),
    ``*.y`` or ``layers.1.x_re``: only those tensors are compared and need to be in the dump (a
    partial dump of one core); a stress sub-bundle's names start with ``stress/``. A pattern that
    names no output tensor is an error. Malformed or truncated dumps raise ValueError naming the
    file and line (from ``read_memh``); differing words are listed, none is left out.
    """
    report = CompareReport()
    _compare_into(report, Path(expected_dir), Path(rtl_dir), only, prefix="")
    if only is not None and report.words == 0:
        raise ValueError(f"--only {only!r} matches no output tensor of {expected_dir}")
    report.mismatches.sort(key=Mismatch.order)
    return report


def _compare_into(report: CompareReport, expected_dir: Path, rtl_dir: Path, only: str | None,
                  prefix: str) -> None:
    config = load_vector_config(expected_dir)
    for name, spec in config["tensors"].items():
        full = prefix + name
        if not spec["output"] or (only is not None and not fnmatch.fnmatchcase(full, only)):
            continue
        want = read_tensor(expected_dir, name, spec)
        got = read_tensor(rtl_dir, name, spec)
        report.words += want.size
        axes = spec.get("axes") or AXES.get(want.ndim) or [f"dim{d}" for d in range(want.ndim)]
        for idx in np.argwhere(want != got):
            report.mismatches.append(Mismatch(
                layer=spec["layer"] if "layer" in spec else int(config["layer"]), tensor=full,
                index={axis: int(i) for axis, i in zip(axes, idx)},
                expected=int(want[tuple(idx)]), got=int(got[tuple(idx)])))
    stress = config.get("stress")
    if stress and not prefix:
        sub = str(stress["dir"])
        _compare_into(report, expected_dir / sub, rtl_dir / sub, only, prefix=f"{sub}/")
