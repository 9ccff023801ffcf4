"""The trainer: exact resume, best/last checkpoints, metrics log, divergence, config mismatch."""
import json

import numpy as np
import pytest

from qs4d_np.core.module import Module
from qs4d_np.data.sequence import SequenceDataset
from qs4d_np.train.checkpoint import CheckpointError, load_checkpoint, load_model_arrays
from qs4d_np.train.trainer import TrainConfig, Trainer, TrainingDiverged
from reference.gradcheck import grad_error, numerical_grad

L, H, CLASSES = 8, 6, 3


class TinyModel(Module):
    """A small classifier with what real models carry: a complex parameter, an SSM-group
    parameter, a dropout generator and a buffer.

    p = mean_t(x @ W_enc); s = exp(log_dt) * (Re C + Im(C)**2); q = p * s;
    z = (q - running_mean) * dropout mask; logits = z @ W_dec + b.
    The running mean of q is updated in training (after use) and is a constant for the gradient.
    """

    def __init__(self, seed, dtype=np.float32):
        super().__init__()
        rng = np.random.default_rng(seed)
        ctype = np.complex64 if dtype == np.float32 else np.complex128
        self._params = {
            "W_enc": rng.normal(size=(1, H)).astype(dtype),
            "log_dt": rng.uniform(-1, 0, size=H).astype(dtype),
            "C": (rng.normal(size=H) + 1j * rng.normal(size=H)).astype(ctype),
            "W_dec": (rng.normal(size=(H, CLASSES)) / np.sqrt(H)).astype(dtype),
            "b": np.zeros(CLASSES, dtype=dtype),
        }
        self.buffers = {"running_mean": np.zeros(H, dtype=dtype)}
        self.rng = np.random.default_rng(seed + 1000)
        self.config = {"d_model": H, "classes": CLASSES}

    def param_groups(self):
        return [{"names": ["W_enc", "C", "W_dec", "b"], "ssm": False}, {"names": ["log_dt"], "ssm": True}]

    def forward(self, x, training=False):
        P = self._params
        p = (x @ P["W_enc"]).mean(axis=1)
        e = np.exp(P["log_dt"])
        s = e * (P["C"].real + P["C"].imag ** 2)
        q = p * s
        mask = ((self.rng.random(q.shape) >= 0.25) / 0.75).astype(q.dtype) if training else np.ones_like(q)
        z = (q - self.buffers["running_mean"]) * mask
        if training:
            self.buffers["running_mean"][...] = 0.9 * self.buffers["running_mean"] + 0.1 * q.mean(axis=0)
        self._cache = (x, p, e, s, mask, z)
        return z @ P["W_dec"] + P["b"]

    def backward(self, grad):
        x, p, e, s, mask, z = self._saved()
        P = self._params
        dz = grad @ P["W_dec"].T
        dq = dz * mask
        ds = (dq * p).sum(axis=0)
        dp = dq * s
        self._grads = {
            "W_dec": z.T @ grad,
            "b": grad.sum(axis=0),
            "log_dt": ds * s,
            "C": ds * e + 1j * (ds * e * 2 * P["C"].imag),
            "W_enc": np.einsum("bld,bh->dh", x, dp) / x.shape[1],
        }
        return None


def _data(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=n)
    pixels = np.clip(labels[:, None] * 80 + 20 + rng.normal(0, 40, size=(n, L)), 0, 255).astype(np.uint8)
    return SequenceDataset(pixels[:, :, None], labels, (0.5,), (0.25,))


def _trainer(tmp_path, name, model_seed=0, on_epoch_end=None, progress=False, n_train=96, **overrides):
    settings = dict(epochs=3, batch_size=16, eval_batch_size=32, lr=0.05, weight_decay=0.05, seed=7,
                    clip_norm=5.0, warmup_epochs=1)
    settings.update(overrides)
    return Trainer(TinyModel(model_seed), _data(n_train, 1), _data(32, 2), TrainConfig(**settings), tmp_path / name,
                   test_data=_data(32, 3), run_info={"dataset": "synthetic"}, progress=progress,
                   on_epoch_end=on_epoch_end)


class Killed(Exception):
    pass


def _kill_after(epoch):
    def hook(trainer, record):
        if record["epoch"] == epoch:
            raise Killed
    return hook


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_tiny_model_gradients():
    model = TinyModel(3, dtype=np.float64)
    x = np.random.default_rng(4).normal(size=(5, L, 1))
    g = np.random.default_rng(5).normal(size=(5, CLASSES))
    state = model.rng.bit_generator.state
    model.forward(x, training=True)
    model.backward(g)

    def loss():
        model.rng.bit_generator.state = state  # the same dropout mask at every evaluation
        model.buffers["running_mean"][...] = 0.0
        return float(np.sum(model.forward(x, training=True) * g))
    for name, p in model.params.items():
        assert grad_error(model.grads[name], numerical_grad(loss, p)) <= 1e-6, name


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    straight = _trainer(tmp_path, "straight")
    results = straight.fit()
    killed = _trainer(tmp_path, "resumed", on_epoch_end=_kill_after(1))
    with pytest.raises(Killed):
        killed.fit()
    _, meta = load_checkpoint(tmp_path / "resumed", "last")
    assert meta["epoch"] == 1
    # a fresh process: different initial weights and generator states, all replaced by the checkpoint
    resumed = _trainer(tmp_path, "resumed", model_seed=99)
    resumed_results = resumed.fit(resume=True)
    a, meta_a = load_checkpoint(tmp_path / "straight", "last")
    b, meta_b = load_checkpoint(tmp_path / "resumed", "last")
    assert sorted(a) == sorted(b) and any(k.startswith("buffers/") for k in a) and "optim/m.C" in a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert meta_a["rng"] == meta_b["rng"] and meta_a["optimizer"]["step"] == meta_b["optimizer"]["step"] == 18
    for ra, rb in zip(meta_a["history"], meta_b["history"]):
        assert {k: v for k, v in ra.items() if "seconds" not in k and "per_s" not in k} == \
               {k: v for k, v in rb.items() if "seconds" not in k and "per_s" not in k}
    assert results == resumed_results
    for name in straight.model.params:
        np.testing.assert_array_equal(straight.model.params[name], resumed.model.params[name])
    # the run really trained: the weights moved and the loss fell
    assert not np.array_equal(a["params/W_dec"], TinyModel(0).params["W_dec"])
    assert meta_a["history"][-1]["train_loss"] < meta_a["history"][0]["train_loss"]


def test_log_best_checkpoint_and_results(tmp_path, capsys):
    trainer = _trainer(tmp_path, "run", progress=True)
    results = trainer.fit()
    folder = tmp_path / "run"
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "train_samples_per_s"} <= set(lines[0])
    # warmup epoch then cosine over 2 epochs: factors 0.5, 1.0, 0.5; SSM group capped at 0.001
    assert [r["lr"] for r in lines] == [[0.025, 0.0005], [0.05, 0.001], [pytest.approx(0.025), pytest.approx(0.0005)]]
    accs = [r["val_acc"] for r in lines]
    best_epoch = int(np.argmax(accs)) + 1  # first maximum: later ties do not replace it
    _, best_meta = load_checkpoint(folder, "best")
    assert best_meta["epoch"] == best_epoch == results["best_epoch"]
    # the final model holds the best weights, and the test score is theirs
    assert trainer.evaluate(trainer.test_batches, "test")["acc"] == results["test_acc"]
    assert json.loads((folder / "results.json").read_text()) == results
    # only the current pair of each checkpoint remains
    names = sorted(p.name for p in folder.glob("*.npz"))
    assert len(names) == 2 and names[0].startswith(f"best-e{best_epoch:04d}-") and names[1].startswith("last-e0003-")
    assert "epoch 3/3" in capsys.readouterr().err


def test_resume_with_other_config_fails_and_writes_nothing(tmp_path):
    with pytest.raises(Killed):
        _trainer(tmp_path, "run", on_epoch_end=_kill_after(1)).fit()
    before = _files(tmp_path / "run")
    with pytest.raises(CheckpointError,
                       match=r"(?s)differs from the checkpoint.*train\.lr: 0\.05 in the checkpoint, 0\.01 now"):
        _trainer(tmp_path, "run", lr=0.01).fit(resume=True)
    with pytest.raises(CheckpointError, match="data_sizes.train: 96 in the checkpoint, 80 now"):
        _trainer(tmp_path, "run", n_train=80).fit(resume=True)
    with pytest.raises(CheckpointError, match="already holds a run"):
        _trainer(tmp_path, "run").fit()
    assert _files(tmp_path / "run") == before
    with pytest.raises(CheckpointError, match="no checkpoint 'last.json'"):
        _trainer(tmp_path, "empty").fit(resume=True)


def test_damaged_checkpoint_is_detected(tmp_path):
    with pytest.raises(Killed):
        _trainer(tmp_path, "run", on_epoch_end=_kill_after(1)).fit()
    (npz,) = (tmp_path / "run").glob("last-e0001-*.npz")
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{npz.name} has SHA-256"):
        _trainer(tmp_path, "run").fit(resume=True)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poison(trainer, record):
        if record["epoch"] == 1:
            trainer.model.params["W_dec"][0, 0] = np.nan

    # W_dec[0, 0] feeds class 0 of every sample: 16 non-finite logits in a batch of 16
    with pytest.raises(TrainingDiverged,
                       match=r"(?s)epoch 2, step 1: count of non-finite logits = 16.*last\.json \(epoch 1\)"):
        _trainer(tmp_path, "run", on_epoch_end=poison).fit()
    arrays, meta = load_checkpoint(tmp_path / "run", "last")
    assert meta["epoch"] == 1 and all(np.isfinite(v).all() for v in arrays.values())


def test_config_is_checked():
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0.0)
    with pytest.raises(TypeError, match="epochs must be an integer"):
        TrainConfig(epochs=2.5)


def test_best_weights_exported_through_model_save(tmp_path):
    saved = {}

    class SavingModel(TinyModel):
        def save(self, path):
            saved["path"] = path
            saved["params"] = {k: v.copy() for k, v in self.params.items()}

    settings = TrainConfig(epochs=3, batch_size=16, eval_batch_size=32, lr=0.05, weight_decay=0.05, seed=7)
    trainer = Trainer(SavingModel(0), _data(96, 1), _data(32, 2), settings, tmp_path / "run", progress=False)
    trainer.fit()
    best = load_model_arrays(tmp_path / "run", "best")
    assert sorted(best) == sorted([f"params/{k}" for k in saved["params"]] + ["buffers/running_mean"])
    assert saved["path"] == tmp_path / "run" / "best_model"
    for name, value in saved["params"].items():
        np.testing.assert_array_equal(value, best[f"params/{name}"])
