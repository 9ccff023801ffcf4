"""The sequence-classification tasks by name, with the standard train/val/test splits.

| task | data | L | d_in | layout |
|---|---|---|---|---|
| ``smnist`` | MNIST (source chain of :mod:`qs4d_np.data.mnist`) | 784 | 1 | pixels / 255 |
| ``psmnist`` | the same, time steps permuted by ``permute_seed`` | 784 | 1 | pixels / 255 |
| ``scifar`` | CIFAR-10 from ``data_dir``, grayscale | 1024 | 1 | (p/255 - 122.6/255) / (61.0/255) |
| ``scifar-rgb`` | CIFAR-10 from ``data_dir``, RGB | 1024 | 3 | per-channel statistics |

The training split is divided 90/10 into train/val with seed 42 (the
state-spaces example; 45k/5k for CIFAR-10), the official test split is the test set.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from qs4d_np.core.checks import check_choice
from qs4d_np.data.cifar import cifar_sequences, load_cifar10
from qs4d_np.data.mnist import load_mnist_splits, mnist_sequences, source_identity
from qs4d_np.data.sequence import SequenceDataset
from qs4d_np.data.split import train_val_split

TASKS = ("smnist", "psmnist", "scifar", "scifar-rgb")


@dataclass
class Task:
    """Train / val / test datasets of one task and their shape."""

    name: str
    train: SequenceDataset
    val: SequenceDataset
    test: SequenceDataset
    n_classes: int = 10

    @property
    def length(self) -> int:
        return self.train.length

    @property
    def d_in(self) -> int:
        return self.train.d_in

    def info(self) -> dict[str, Any]:
        """JSON-ready description (what a checkpoint's ``run_info`` records): the same data gives the
        same description wherever it is stored (``source`` names no installation path, ``sha256``
        is the content of the three splits)."""
        digest = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            split.update_hash(digest)
        return {"task": self.name, "length": self.length, "d_in": self.d_in, "n_classes": self.n_classes,
                "sizes": [len(self.train), len(self.val), len(self.test)],
                "source": source_identity(self.train.source), "sha256": digest.hexdigest()}


def load_task(name: str, data_dir: str | os.PathLike | None = None, *, val_fraction: float = 0.1,
              split_seed: int = 42, permute_seed: int = 0, **mnist_kwargs: Any) -> Task:
    """Load task ``name`` (see module doc). CIFAR-10 needs ``data_dir``; MNIST falls back offline.

    ``mnist_kwargs`` go to :func:`qs4d_np.data.mnist.load_mnist` (cache_dir, download, ...).
    """
    check_choice("name", name, TASKS)
    if name in ("smnist", "psmnist"):
        train_split, test_split = load_mnist_splits(data_dir, **mnist_kwargs)
        seed = permute_seed if name == "psmnist" else None
        full, test = mnist_sequences(train_split, seed), mnist_sequences(test_split, seed)
    else:
        if data_dir is None:
            raise ValueError(f"task {name!r} needs data_dir: a folder with the CIFAR-10 binary or python batches")
        grayscale = name == "scifar"
        full = cifar_sequences(load_cifar10("train", data_dir), grayscale)
        test = cifar_sequences(load_cifar10("test", data_dir), grayscale)
    if len(full) < 2:
        raise ValueError(f"task {name!r}: the training data ({full.source}) holds {len(full)} sample(s); "
                         "expected at least 2 (a train and a validation part)")
    train_idx, val_idx = train_val_split(len(full), val_fraction, split_seed)
    return Task(name, full.subset(train_idx, " [train part]"), full.subset(val_idx, " [val part]"), test)
