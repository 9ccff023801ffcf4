"""Images as pixel sequences: the float layout the models read, built batch by batch.

The pixels stay uint8 in memory (60,000 MNIST images are 47 MB as bytes,
188 MB as float32) and each batch is converted on demand:

    x = (pixels[idx][:, permutation] / 255 - mean) / std    float32, (batch, L, d_in)

as torchvision's ToTensor + Normalize compute it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from qs4d_np.core.checks import check_array


@dataclass
class SequenceDataset:
    """Classification sequences: ``pixels`` uint8 (n, L, d_in), ``labels`` int64 (n,).

    ``mean`` / ``std`` are per input channel (length d_in), in units of
    pixel/255; ``permutation`` (length L) reorders time steps (psMNIST), or
    None. ``source`` says where the data came from.
    """

    pixels: np.ndarray
    labels: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    permutation: np.ndarray | None = None
    source: str = ""

    def __post_init__(self) -> None:
        check_array("pixels", self.pixels, ndim=3)
        if self.pixels.dtype != np.uint8:
            raise TypeError(f"pixels must have dtype uint8, got {self.pixels.dtype}")
        n, length, d_in = self.pixels.shape
        self.labels = check_array("labels", self.labels, shape=(n,)).astype(np.int64, copy=False)
        if len(self.mean) != d_in or len(self.std) != d_in:
            raise ValueError(f"mean and std need one value per input channel ({d_in}), "
                             f"got {len(self.mean)} and {len(self.std)}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.permutation is not None:
            perm = check_array("permutation", self.permutation, shape=(length,))
            if not np.array_equal(np.sort(perm), np.arange(length)):
                raise ValueError(f"permutation must be a permutation of range({length})")

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def length(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def d_in(self) -> int:
        return int(self.pixels.shape[2])

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (x float32 (len(idx), L, d_in), y int64 (len(idx),)) for sample indices ``idx``."""
        raw = self.pixels[idx]
        if self.permutation is not None:
            raw = raw[:, self.permutation]
        # the same float32 operations in the same order as torchvision's ToTensor + Normalize
        x = raw.astype(np.float32) / np.float32(255.0)
        x -= np.asarray(self.mean, dtype=np.float32)
        x /= np.asarray(self.std, dtype=np.float32)
        return x, self.labels[idx]

    def update_hash(self, digest: "hashlib._Hash") -> None:
        """Feed this dataset's content (pixels, labels, layout) to ``digest`` (e.g. ``hashlib.sha256()``)."""
        for array in (self.pixels, self.labels, np.asarray(self.mean + self.std, dtype=np.float64),
                      np.asarray([] if self.permutation is None else self.permutation, dtype=np.int64)):
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}{array.shape};".encode())
            digest.update(array.data)

    def subset(self, idx: np.ndarray, source_note: str = "") -> "SequenceDataset":
        """The samples ``idx`` (copied) with the same layout."""
        return SequenceDataset(self.pixels[idx], self.labels[idx], self.mean, self.std, self.permutation,
                               f"{self.source}{source_note}")


def seeded_permutation(length: int, seed: int) -> np.ndarray:
    """The fixed time-step permutation of permuted sequential tasks (psMNIST)."""
    return np.random.default_rng(seed).permutation(length)
