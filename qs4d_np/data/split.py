"""Seeded index splits: train/validation and class-stratified train/test.

Both draw from ``np.random.default_rng(seed)``. The state-spaces example
splits with torch's ``random_split`` and seed 42; the same seed here gives a
different (but equally fixed) split, since NumPy's generator is not torch's.
"""
from __future__ import annotations

import numpy as np

from qs4d_np.core.checks import check_array, check_float, check_int


def train_val_split(n: int, val_fraction: float = 0.1, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (train, val) index arrays of sizes ``int(n * (1 - val_fraction))`` and the rest.

    The sizes are the state-spaces example's (90/10, seed 42 by default);
    50,000 CIFAR training images give the QS4D 45k/5k split. Each part is sorted.
    """
    n = check_int("n", n, min_value=2)
    val_fraction = check_float("val_fraction", val_fraction, min_value=0.0, max_value=1.0,
                               min_inclusive=False, max_inclusive=False)
    n_val = n - int(n * (1.0 - val_fraction))
    if not 0 < n_val < n:
        raise ValueError(f"val_fraction={val_fraction} of n={n} leaves an empty part ({n - n_val}/{n_val})")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so every class keeps ``round(count * test_fraction)`` samples for test.

    Returns (train, test) index arrays, each in a seeded shuffled order (so a
    class-sorted source does not stay sorted).
    """
    labels = check_array("labels", labels, ndim=1)
    test_fraction = check_float("test_fraction", test_fraction, min_value=0.0, max_value=1.0,
                                min_inclusive=False, max_inclusive=False)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(idx.size * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))
