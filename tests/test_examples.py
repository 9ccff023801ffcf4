"""The example scripts in smoke configurations (tiny data and models through their flags)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from qs4d_np.cli.common import load_model
from qs4d_np.data.cifar import RECORD_BYTES

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_cifar_binary(folder, n_per_batch, rng):
    """CIFAR-10 binary batches: records of a label byte and 3 x 1024 colour bytes."""
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        records = rng.integers(0, 256, size=(n_per_batch, RECORD_BYTES)).astype(np.uint8)
        records[:, 0] = rng.integers(0, 10, size=n_per_batch)
        (folder / f"{name}.bin").write_bytes(records.tobytes())


def test_scifar10_example_needs_data_and_runs_a_smoke_configuration(tmp_path, capsys):
    scifar = _example("scifar10_qat")
    assert scifar.main(["--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "no CIFAR-10 batches" in err and scifar.CIFAR_URL in err
    assert not (tmp_path / "run").exists()

    data = tmp_path / "cifar-10-batches-bin"
    data.mkdir()
    _write_cifar_binary(data, 8, np.random.default_rng(0))
    argv = ["--data-dir", str(tmp_path), "--limit-train", "18", "--limit-test", "6", "--epochs", "1",
            "--n_layers_m", "1", "--d_model_m", "4", "--d_state", "4", "--batch_size", "8", "--quiet",
            "--out", str(tmp_path / "run")]
    assert scifar.main(argv) == 0
    model = load_model(tmp_path / "run")
    # the paper's setup: qs4d preset (BatchNorm, no residual), grayscale input of length 1024
    assert (model.config["norm"], model.config["residual"], model.d_input) == ("batch", False, 1)
    info = json.loads((tmp_path / "run" / "best.json").read_text())["identity"]["run_info"]
    assert info["task"]["task"] == "scifar" and info["task"]["length"] == 1024
    assert info["task"]["sizes"] == [18, 2, 6]
