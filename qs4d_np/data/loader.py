"""Mini-batches over a dataset, reshuffled every epoch by a seeded generator."""
from __future__ import annotations

from typing import Any, Iterator, Protocol

import numpy as np

from qs4d_np.core.checks import check_bool, check_int


class BatchSource(Protocol):
    def __len__(self) -> int: ...

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class BatchIterator:
    """Iterate (x, y) batches of ``dataset``; each call of :meth:`epoch` is one pass.

    With ``shuffle`` every pass draws a fresh permutation from ``rng``; the
    generator's state (:meth:`rng_state`) is what a checkpoint saves to
    continue the same sequence of epochs after a resume.
    """

    def __init__(self, dataset: BatchSource, batch_size: int, *, shuffle: bool = False,
                 seed: int | np.random.Generator | None = 0, drop_last: bool = False) -> None:
        self.dataset = dataset
        self.batch_size = check_int("batch_size", batch_size, min_value=1)
        self.shuffle = check_bool("shuffle", shuffle)
        self.drop_last = check_bool("drop_last", drop_last)
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        if len(self) == 0:
            raise ValueError(f"batch_size={batch_size} with drop_last leaves no batch of {len(dataset)} samples")

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n = len(self.dataset)
        # the permutation is drawn here, eagerly, so the generator state after
        # this call does not depend on how far the caller iterates
        order = self.rng.permutation(n) if self.shuffle else np.arange(n)
        return (self.dataset.batch(order[i * self.batch_size:(i + 1) * self.batch_size]) for i in range(len(self)))

    def rng_state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state
