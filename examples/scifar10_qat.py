"""The QS4D paper's sequential CIFAR-10 (grayscale) setup, for user-supplied CIFAR-10.

The ``qs4d`` preset (4 layers, H = 128, N = 64, BatchNorm postnorm, GLU
mixing, no residual, A_imag = pi*n/4), grayscale pixels normalised with mean
122.6/255 and std 61.0/255 (L = 1024, d_in = 1), a 45k/5k train/val split,
AdamW lr 0.01, weight decay 0.05 (SSM parameters at lr 0.001, no decay),
batch 64, cosine schedule. Quantization flags are the reference's (numbers of
quantization states), e.g. ``--all_quant 64`` for homogeneous 6-bit QAT::

    python examples/scifar10_qat.py --data-dir ~/data/cifar-10-batches-py --out runs/scifar_fp
    python examples/scifar10_qat.py --data-dir ~/data/cifar-10-batches-py --all_quant 64 --out runs/scifar_q6
    python examples/scifar10_qat.py --data-dir ... --limit-train 256 --limit-test 128 --epochs 1 --out /tmp/smoke

Any other ``qs4d train`` flag passes through (``--epochs``, ``--lr``,
``--init-from``, ``--A_quant``, ``--grid``, ``--resume``...). Afterwards:
``qs4d ptq --checkpoint runs/scifar_fp --bits 4 6 8 10 12 --targets all A C state --out runs/scifar_fp/ptq``
and ``qs4d plot runs/scifar_fp/ptq/ptq.json runs/scifar_q6 --out fig.png``.
On a 2-core CPU one epoch of the full set takes hours; the smoke flags exist for that.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from qs4d_np.cli.main import main as qs4d

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
# the paper's recipe; later flags given by the user win (argparse keeps the last value)
PAPER_FLAGS = ["--dataset", "cifar10", "--grayscale", "--preset", "qs4d", "--n_layers_m", "4", "--d_model_m", "128",
               "--d_state", "64", "--lr", "0.01", "--weight_decay", "0.05", "--batch_size", "64", "--epochs", "100"]


def has_cifar10(data_dir: Path) -> bool:
    """True when ``data_dir`` (or its cifar-10-batches-py/-bin folder) holds the first training batch."""
    return any((folder / name).is_file()
               for folder in (data_dir, data_dir / "cifar-10-batches-py", data_dir / "cifar-10-batches-bin")
               for name in ("data_batch_1", "data_batch_1.bin"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other flags are passed to `qs4d train` (see `qs4d train --help`).")
    parser.add_argument("--data-dir", required=True, help="folder with the CIFAR-10 python or binary batches")
    args, rest = parser.parse_known_args(argv)
    data_dir = Path(args.data_dir).expanduser()
    if not has_cifar10(data_dir):
        print(f"scifar10_qat: error: no CIFAR-10 batches in {data_dir} (expected data_batch_1 .. data_batch_5 and "
              f"test_batch, python or binary version). Download cifar-10-python.tar.gz or "
              f"cifar-10-binary.tar.gz from {CIFAR_URL} and unpack it into {data_dir}.", file=sys.stderr)
        return 1
    return qs4d(["train", *PAPER_FLAGS, "--data-dir", str(data_dir), *rest])


if __name__ == "__main__":
    sys.exit(main())
