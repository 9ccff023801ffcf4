"""The trainer with the project's S4DModel: exact resume, and the checkpoints load back into the model."""
import numpy as np
import pytest

from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.train.checkpoint import load_checkpoint, load_model_arrays
from qs4d_np.train.trainer import TrainConfig, Trainer
from test_trainer_ops import _data


def _trainer(tmp_path, name, hook=None, noise=0.0, noise_eval=True):
    model = S4DModel(1, 3, d_model=8, d_state=4, n_layers=2, norm="batch", dropout=0.1, seed=0)
    config = TrainConfig(epochs=3, batch_size=16, eval_batch_size=32, lr=0.01, weight_decay=0.05, seed=2,
                         **(dict(noise=noise, noise_targets=("A", "C", "linear"), noise_eval=noise_eval) if noise else {}))
    return Trainer(model, _data(64, 1), _data(32, 2), config, tmp_path / name, test_data=_data(32, 3),
                   progress=False, on_epoch_end=hook)


def test_s4d_model_resume_is_exact_and_checkpoints_load(tmp_path):
    straight = _trainer(tmp_path, "straight")
    results = straight.fit()

    def kill(trainer, record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path, "resumed", hook=kill).fit()
    assert _trainer(tmp_path, "resumed").fit(resume=True) == results
    a, _ = load_checkpoint(tmp_path / "straight", "last")
    b, _ = load_checkpoint(tmp_path / "resumed", "last")
    assert any(k.startswith("buffers/") for k in a) and any(k.endswith("log_A_real") for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # the best checkpoint loads into a fresh model and into the model's own file format
    fresh = S4DModel(1, 3, d_model=8, d_state=4, n_layers=2, norm="batch", dropout=0.1, seed=1)
    fresh.load_arrays(load_model_arrays(tmp_path / "straight", "best"))
    exported = S4DModel.load(tmp_path / "straight" / "best_model")
    x, _ = _data(32, 3).batch(np.arange(32))
    expected = straight.model.forward(x, training=False)
    np.testing.assert_array_equal(fresh.forward(x, training=False), expected)
    np.testing.assert_array_equal(exported.forward(x, training=False), expected)


def _final_params(tmp_path, name):
    return load_checkpoint(tmp_path / name, "last")[0]


def test_noise_aware_training_changes_training_is_seeded_and_resumes_exactly(tmp_path):
    _trainer(tmp_path, "clean").fit()
    _trainer(tmp_path, "noisy", noise=0.05).fit()
    _trainer(tmp_path, "noisy_again", noise=0.05).fit()

    def kill(trainer, record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path, "noisy_resumed", hook=kill, noise=0.05).fit()
    _trainer(tmp_path, "noisy_resumed", noise=0.05).fit(resume=True)
    clean, noisy = _final_params(tmp_path, "clean"), _final_params(tmp_path, "noisy")
    key = "params/layers.0.ssm.C"
    assert not np.array_equal(clean[key], noisy[key])
    for other in ("noisy_again", "noisy_resumed"):
        again = _final_params(tmp_path, other)
        for k in noisy:
            np.testing.assert_array_equal(noisy[k], again[k], err_msg=f"{other}: {k}")


def test_a_run_checkpointed_before_the_noise_options_resumes(tmp_path):
    # a last.json written with the old names (train.weight_noise = 0, rng.weight_noise) still resumes
    import json

    def kill(trainer, record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path, "old", hook=kill).fit()
    path = tmp_path / "old" / "last.json"
    meta = json.loads(path.read_text())
    train = meta["identity"]["train"]
    for key in ("noise", "noise_protocol", "noise_targets", "noise_eval"):
        del train[key]
    train["weight_noise"] = 0.0
    meta["rng"]["weight_noise"] = meta["rng"].pop("noise")
    path.write_text(json.dumps(meta))
    resumed = _trainer(tmp_path, "old").fit(resume=True)
    assert resumed == _trainer(tmp_path, "straight").fit()


def test_noise_eval_keeps_the_noise_on_in_validation_only_when_asked(tmp_path):
    from qs4d_np.train.trainer import evaluate_model
    on = _trainer(tmp_path, "on", noise=0.3)
    off = _trainer(tmp_path, "off", noise=0.3, noise_eval=False)
    clean = evaluate_model(off.model, off.val_batches)
    state = off.noise_rng.bit_generator.state
    assert off.evaluate(off.val_batches, "val") == {"loss": clean["loss"], "acc": clean["acc"]}
    assert off.noise_rng.bit_generator.state == state  # nothing drawn
    first, second = on.evaluate(on.val_batches, "val"), on.evaluate(on.val_batches, "val")
    assert first["loss"] != clean["loss"] and second["loss"] != first["loss"]  # noisy, redrawn
    assert on.noise_rng.bit_generator.state != state
