"""The trainer with the project's own ops (Linear, PointwiseGLU, Dropout, BatchNorm, MeanPool):
nested buffers and dropout generators are found by name and a resumed run is exact."""
import numpy as np
import pytest

from qs4d_np.core.dropout import Dropout
from qs4d_np.core.linear import Linear
from qs4d_np.core.mixing import PointwiseGLU
from qs4d_np.core.module import Module
from qs4d_np.core.norm import BatchNorm
from qs4d_np.core.pooling import MeanPool
from qs4d_np.data.sequence import SequenceDataset
from qs4d_np.train.checkpoint import load_checkpoint, model_buffers, model_generators
from qs4d_np.train.trainer import TrainConfig, Trainer


class Block(Module):
    def __init__(self, d, seed):
        super().__init__()
        self.mix = self.add_child("mix", PointwiseGLU(d, seed=seed))
        self.drop = self.add_child("drop", Dropout(0.2, seed=seed + 1))
        self.norm = self.add_child("norm", BatchNorm(d))

    def forward(self, x, training=False):
        return self.norm.forward(self.drop.forward(self.mix.forward(x, training), training), training)

    def backward(self, grad):
        return self.mix.backward(self.drop.backward(self.norm.backward(grad)))


class OpsModel(Module):
    def __init__(self, seed, d=8, classes=3):
        super().__init__()
        self.config = {"d_model": d, "classes": classes}
        self.encoder = self.add_child("encoder", Linear(1, d, seed=seed))
        self.block = self.add_child("block", Block(d, seed + 10))
        self.pool = self.add_child("pool", MeanPool())
        self.decoder = self.add_child("decoder", Linear(d, classes, seed=seed + 20))

    def param_groups(self):
        return [{"names": list(self.params), "ssm": False}]

    def forward(self, x, training=False):
        h = self.block.forward(self.encoder.forward(x, training), training)
        return self.decoder.forward(self.pool.forward(h, training), training)

    def backward(self, grad):
        g = self.block.backward(self.pool.backward(self.decoder.backward(grad)))
        return self.encoder.backward(g)


def _data(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    pixels = np.clip(labels[:, None] * 80 + 20 + rng.normal(0, 40, size=(n, 16)), 0, 255).astype(np.uint8)
    return SequenceDataset(pixels[:, :, None], labels, (0.5,), (0.25,))


def _trainer(tmp_path, name, seed=0, hook=None):
    config = TrainConfig(epochs=3, batch_size=16, eval_batch_size=32, lr=0.01, weight_decay=0.05, seed=3)
    return Trainer(OpsModel(seed), _data(64, 1), _data(32, 2), config, tmp_path / name, progress=False,
                   on_epoch_end=hook)


def test_state_of_nested_ops_is_found():
    model = OpsModel(0)
    assert sorted(model_buffers(model)) == ["block.norm.running_mean", "block.norm.running_var"]
    assert list(model_generators(model)) == ["block.drop:rng"]


def test_resume_with_real_ops_is_exact(tmp_path):
    _trainer(tmp_path, "straight").fit()

    def kill(trainer, record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path, "resumed", hook=kill).fit()
    _trainer(tmp_path, "resumed", seed=50).fit(resume=True)
    a, _ = load_checkpoint(tmp_path / "straight", "last")
    b, _ = load_checkpoint(tmp_path / "resumed", "last")
    assert "buffers/block.norm.running_var" in a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
