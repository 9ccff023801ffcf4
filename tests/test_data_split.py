"""Seeded splits, the sequence dataset's checks and the batch iterator."""
import numpy as np
import pytest

from qs4d_np.data.loader import BatchIterator
from qs4d_np.data.sequence import SequenceDataset
from qs4d_np.data.split import stratified_split, train_val_split


def test_train_val_split_sizes_and_determinism():
    train, val = train_val_split(50_000)
    assert (len(train), len(val)) == (45_000, 5_000)
    assert len(np.union1d(train, val)) == 50_000 and len(np.intersect1d(train, val)) == 0
    again, _ = train_val_split(50_000)
    np.testing.assert_array_equal(train, again)
    other, _ = train_val_split(50_000, seed=1)
    assert not np.array_equal(train, other)
    assert [len(p) for p in train_val_split(60_000)] == [54_000, 6_000]
    with pytest.raises(ValueError, match="val_fraction must be < 1"):
        train_val_split(10, 1.0)


def test_stratified_split():
    labels = np.repeat(np.arange(4), 10)
    train, test = stratified_split(labels, 0.3, seed=0)
    assert np.bincount(labels[test]).tolist() == [3] * 4
    assert np.bincount(labels[train]).tolist() == [7] * 4
    assert len(np.intersect1d(train, test)) == 0


def _dataset(n=10, length=4):
    pixels = np.arange(n * length, dtype=np.uint8).reshape(n, length, 1)
    return SequenceDataset(pixels, np.arange(n) % 3, (0.0,), (1.0,))


def test_sequence_dataset_rejects_bad_input():
    with pytest.raises(TypeError, match="pixels must have dtype uint8"):
        SequenceDataset(np.zeros((2, 3, 1)), np.zeros(2), (0.0,), (1.0,))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        SequenceDataset(np.zeros((2, 3, 1), np.uint8), np.zeros(3), (0.0,), (1.0,))
    with pytest.raises(ValueError, match="one value per input channel"):
        SequenceDataset(np.zeros((2, 3, 1), np.uint8), np.zeros(2), (0.0, 0.0), (1.0,))
    with pytest.raises(ValueError, match="permutation must be a permutation of range"):
        SequenceDataset(np.zeros((2, 3, 1), np.uint8), np.zeros(2), (0.0,), (1.0,), np.array([0, 0, 1]))


def test_batch_iterator_covers_each_sample_once_per_epoch():
    data = _dataset(10)
    it = BatchIterator(data, 4, shuffle=True, seed=3)
    assert len(it) == 3
    seen = [np.concatenate([x[:, 0, 0] for x, _ in it.epoch()]) for _ in range(2)]
    for s in seen:
        assert sorted(np.rint(s * 255 / 4).astype(int).tolist()) == list(range(10))  # sample i starts at pixel 4*i
    assert not np.array_equal(seen[0], seen[1])  # reshuffled every epoch
    assert [x.shape[0] for x, _ in BatchIterator(data, 4, drop_last=True).epoch()] == [4, 4]
    ordered = np.concatenate([y for _, y in BatchIterator(data, 3).epoch()])
    np.testing.assert_array_equal(ordered, np.arange(10) % 3)
    with pytest.raises(ValueError, match="leaves no batch"):
        BatchIterator(data, 11, drop_last=True)


def test_batch_iterator_rng_state_resumes_the_same_order():
    data = _dataset(10)
    a = BatchIterator(data, 5, shuffle=True, seed=9)
    next(iter(a.epoch()))  # partly consumed epochs still advance the generator by one permutation
    state = a.rng_state()
    expected = [y for _, y in a.epoch()]
    b = BatchIterator(data, 5, shuffle=True, seed=123)
    b.set_rng_state(state)
    for want, (_, got) in zip(expected, b.epoch()):
        np.testing.assert_array_equal(want, got)
