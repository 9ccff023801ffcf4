"""Checkpoint pairs survive crashes: an interrupted save keeps the old pair, a SIGKILLed run resumes exactly."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qs4d_np.train import checkpoint as ckpt
from qs4d_np.train.checkpoint import CheckpointError, config_differences, load_checkpoint, model_generators, save_checkpoint

TESTS = Path(__file__).resolve().parent


def test_crash_between_arrays_and_metadata_keeps_old_pair(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, "last", 1, {"w": np.arange(3.0)}, {"epoch": 1})

    def crash(path, obj):
        raise KeyboardInterrupt("killed while writing the metadata")
    monkeypatch.setattr(ckpt, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, "last", 2, {"w": np.full(3, 9.0)}, {"epoch": 2})
    monkeypatch.undo()
    arrays, meta = load_checkpoint(tmp_path, "last")
    assert meta["epoch"] == 1 and np.array_equal(arrays["w"], np.arange(3.0))
    # the orphaned arrays of the failed save are removed by the next successful one
    assert len(list(tmp_path.glob("last-e0002-*.npz"))) == 1
    save_checkpoint(tmp_path, "last", 3, {"w": np.zeros(3)}, {"epoch": 3})
    assert [p.name[:11] for p in tmp_path.glob("*.npz")] == ["last-e0003-"]


def test_resaving_an_epoch_never_overwrites_the_named_arrays(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, "last", 1, {"w": np.arange(3.0)}, {"epoch": 1})

    def crash(path, obj):
        raise KeyboardInterrupt("killed while writing the metadata")
    monkeypatch.setattr(ckpt, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):  # same epoch, other contents
        save_checkpoint(tmp_path, "last", 1, {"w": np.full(3, 9.0)}, {"epoch": 1})
    monkeypatch.undo()
    arrays, meta = load_checkpoint(tmp_path, "last")
    assert np.array_equal(arrays["w"], np.arange(3.0))


def test_saving_a_tag_leaves_tags_it_prefixes_alone(tmp_path):
    save_checkpoint(tmp_path, "run-eval", 3, {"w": np.ones(2)}, {"epoch": 3})
    save_checkpoint(tmp_path, "run", 1, {"w": np.zeros(2)}, {"epoch": 1})
    save_checkpoint(tmp_path, "run", 2, {"w": np.zeros(2) + 2}, {"epoch": 2})
    assert np.array_equal(load_checkpoint(tmp_path, "run-eval")[0]["w"], np.ones(2))
    assert load_checkpoint(tmp_path, "run")[1]["epoch"] == 2
    assert len(list(tmp_path.glob("run-e0*.npz"))) == 1 and len(list(tmp_path.glob("run-eval-e0*.npz"))) == 1


def test_arrays_file_outside_the_folder_is_refused(tmp_path):
    save_checkpoint(tmp_path, "t", 0, {"w": np.ones(2)}, {"epoch": 0})
    meta = json.loads((tmp_path / "t.json").read_text())
    meta["arrays_file"] = "../elsewhere.npz"
    (tmp_path / "t.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="expected a file name in the same folder"):
        load_checkpoint(tmp_path, "t")


def test_complex_arrays_and_generators_roundtrip(tmp_path):
    class Holder:
        def __init__(self):
            self.rng = np.random.default_rng(5)

    gens = model_generators(Holder())
    assert list(gens) == [":rng"]
    c = np.array([1 + 2j, -3.5j], dtype=np.complex64)
    save_checkpoint(tmp_path, "t", 0, {"params/C": c}, {"rng": gens[":rng"].bit_generator.state})
    arrays, meta = load_checkpoint(tmp_path, "t")
    assert arrays["params/C"].dtype == np.complex64 and np.array_equal(arrays["params/C"], c)
    fresh = np.random.default_rng(0)
    fresh.bit_generator.state = meta["rng"]  # 128-bit PCG64 state survives JSON
    assert fresh.random() == gens[":rng"].random()


def test_config_differences_are_named():
    saved = {"train": {"lr": 0.01, "epochs": 3}, "model": {"d": 4}}
    now = {"train": {"lr": 0.01, "epochs": 5}, "model": {"d": 4, "extra": True}}
    assert config_differences(saved, now) == ["model.extra: not in the checkpoint, now True",
                                              "train.epochs: 3 in the checkpoint, 5 now"]
    assert config_differences(saved, saved) == []


_RUN = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_trainer import _trainer
trainer = _trainer(Path({root!r}), "run", epochs=40)
trainer.fit(resume=Path({root!r}, "run", "last.json").exists())
"""


def test_sigkilled_process_resumes_to_identical_weights(tmp_path):
    sys.path.insert(0, str(TESTS))
    from test_trainer import _trainer

    straight = _trainer(tmp_path, "straight", epochs=40)
    straight.fit()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _RUN.format(tests=str(TESTS), root=str(tmp_path))], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "last.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # wherever it is: mid-step, mid-evaluation or mid-save
    finally:
        proc.wait()
    if proc.returncode == 0:
        pytest.skip("the child finished all 40 epochs before it could be killed")
    _, killed_meta = load_checkpoint(tmp_path / "run", "last")
    resumed = _trainer(tmp_path, "run", model_seed=123, epochs=40)
    resumed.fit(resume=True)
    a, _ = load_checkpoint(tmp_path / "straight", "last")
    b, _ = load_checkpoint(tmp_path / "run", "last")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert 1 <= killed_meta["epoch"] < 40
