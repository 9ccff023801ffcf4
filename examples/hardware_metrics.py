"""Hardware cost reductions vs float32 of the 4 x 128 (N = 64) model, like the QS4D paper's figure.

For uniform widths and one heterogeneous assignment (the widths at which each
target alone kept fp accuracy under QAT in the paper), computes the QS4D
formulas (ACE, model size with the corrected decoder term, ADC complexity)
and the counted IMSSA datapath (bit-weighted MACs, bits stored, ADC bits;
``qs4d_np.hardware.datapath``), each as a reduction factor vs float32, and
the same for the model with half of its SSM modes pruned (``--prune``). No
training; runs in seconds::

    .venv/bin/python examples/hardware_metrics.py [--out runs/figures/hardware_metrics.png]
    .venv/bin/python examples/hardware_metrics.py --checkpoint runs/qat4   # add a trained model's own bits
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from qs4d_np.cli.common import load_model
from qs4d_np.hardware.datapath import bit_widths, metrics_table
from qs4d_np.hardware.metrics import BitWidths
from qs4d_np.hardware.pruning import prune_magnitude
from qs4d_np.models.s4d_model import S4DModel

# the paper's per-target QAT widths that kept fp accuracy (SPEC.md section 2), rounded up
MIXED = BitWidths(A=5, C=3, dt=2, state=6, act=6, lin=4, coder=3, D=6)
FIGURES = [("formulas", "ace", "ACE"), ("formulas", "model_size_bits", "model size"),
           ("formulas", "adc", "ADC complexity"), ("datapath", "bit_ops", "counted bit-MACs"),
           ("datapath", "bits_stored", "counted bits stored"), ("datapath", "adc_bits", "counted ADC bits")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="*", default=[16, 12, 8, 6, 4])
    parser.add_argument("--prune", type=float, default=0.5, help="fraction of SSM modes pruned for the last group")
    parser.add_argument("--checkpoint", default=None, help="also a trained model with its own quantization")
    parser.add_argument("--out", default="runs/figures/hardware_metrics.png", help="figure (runs/ is ignored by git)")
    args = parser.parse_args(argv)

    model = S4DModel.from_preset("qs4d", 1, 10, seed=0)
    setups = [(f"{b} bit", model, BitWidths.uniform(b)) for b in args.bits]
    setups.append(("mixed (paper QAT)", model, MIXED))
    pruned = S4DModel.from_preset("qs4d", 1, 10, seed=0)
    masks = prune_magnitude(pruned, args.prune, "mode")
    masks.apply(pruned)
    setups.append((f"mixed + {args.prune:.0%} modes pruned", pruned, MIXED))
    if args.checkpoint:
        trained = load_model(args.checkpoint)
        layers = len(trained.blocks)
        learn_B = bool(trained.config.get("learn_B", False))
        setups.append((f"{args.checkpoint}", trained,
                       [bit_widths(getattr(trained, "quant", None), i, learn_B=learn_B) for i in range(layers)]))

    rows = {}
    for name, m, bits in setups:
        table = metrics_table(m, bits)
        rows[name] = [table[group][key]["reduction"] for group, key, _ in FIGURES]
        print(f"{name:>28}: " + ", ".join(f"{label} {v:.1f}x" for (_, _, label), v in zip(FIGURES, rows[name])))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / len(rows)
    positions = np.arange(len(FIGURES))
    for i, (name, values) in enumerate(rows.items()):
        ax.bar(positions + (i - (len(rows) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(positions, [label for _, _, label in FIGURES])
    ax.set_yscale("log")
    ax.set_ylabel("reduction vs float32 (x)")
    ax.set_title("4 x 128, N = 64: QS4D formulas (corrected decoder) and counted IMSSA datapath")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
