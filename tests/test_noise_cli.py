"""``qs4d noise`` end to end on a tiny saved run: printed summary, json / csv / png, one-line errors."""
import csv

import numpy as np
import pytest

from qs4d_np.cli.main import main
from qs4d_np.data.tasks import load_task
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.robustness import noise_sweep
from qs4d_np.io import load_json
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.config import QuantConfig
from test_cli import TINY, write_tiny_mnist


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained tiny run directory (it records its data) and a saved QAT model of the same shape."""
    root = tmp_path_factory.mktemp("noise_runs")
    data = write_tiny_mnist(root / "idx")
    assert main(["train", "--data-dir", str(data), *TINY, "--epochs", "1", "--out", str(root / "float")]) == 0
    qat = S4DModel.load(root / "float" / "best_model")
    other = S4DModel(**{**qat.config, "quant": QuantConfig(16)})
    other.load_arrays({k: v for k, v in qat.state_arrays().items()} | {
        k: v for k, v in other.state_arrays().items() if k not in qat.state_arrays()})
    other.save(root / "qat16")
    return root, data


def test_sweep_writes_records_csv_and_figure(runs, tmp_path, capsys):
    root, _ = runs
    checkpoints = [str(root / "float"), str(root / "qat16")]
    argv = ["noise", "--checkpoint", *checkpoints, "--sigma", "0", "0.02", "0.5", "--seeds", "2",
            "--targets", "A", "C", "--limit-test", "6", "--batch-size", "4"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert out.count("sigma") == 2 * 3 and "+-" in out
    meta = load_json(tmp_path / "a" / "noise.json")
    records = meta["records"]
    assert len(records) == 2 * 3 * 2  # models x sigmas x seeds
    assert {r["checkpoint"] for r in records} == set(checkpoints)
    assert meta["protocol"] == "qs4d" and meta["targets"] == ["A", "C"] and meta["samples"] == 6
    for r in records:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["seed"] in (0, 1)
    # sigma 0: every seed gives the clean accuracy; the printed mean is the records' mean
    for name in checkpoints:
        clean = [r["accuracy"] for r in records if r["checkpoint"] == name and r["sigma"] == 0.0]
        assert len(set(clean)) == 1
        assert meta["summary"][name]["mean"][0] == clean[0]
    with open(tmp_path / "a" / "noise.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and float(rows[5]["accuracy"]) == records[5]["accuracy"]
    assert (tmp_path / "a" / "noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # same flags, same numbers
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert load_json(tmp_path / "b" / "noise.json")["records"] == records


def test_crossbar_protocol(runs, tmp_path, capsys):
    root, _ = runs
    assert main(["noise", "--checkpoint", str(root / "float"), "--protocol", "crossbar", "--sigma", "0", "0.05",
                 "--seeds", "1", "--limit-test", "2", "--out", str(tmp_path / "x")]) == 0
    meta = load_json(tmp_path / "x" / "noise.json")
    assert meta["targets"] is None and len(meta["records"]) == 2
    assert meta["crossbar"] == {"config": CrossbarConfig.ideal().to_dict(), "read_noise": "weight",
                                "calib_samples": 0}
    # a config file, calibration and output read noise: recorded, and the same runs as the library's sweep
    config = CrossbarConfig(dac_bits=8, adc_bits=10, noise_management="none", bound_management=False,
                            state_update="increment", weight_scaling="output")
    config.save(tmp_path / "inc.json")
    assert main(["noise", "--checkpoint", str(root / "float"), "--protocol", "crossbar", "--sigma", "0.3",
                 "--seeds", "2", "--limit-test", "4", "--batch-size", "2", "--analog", str(tmp_path / "inc.json"),
                 "--calib-batches", "2", "--read-noise", "output", "--out", str(tmp_path / "y")]) == 0
    meta = load_json(tmp_path / "y" / "noise.json")
    assert meta["crossbar"] == {"config": config.to_dict(), "read_noise": "output", "calib_samples": 4}
    task = load_task("smnist", data_dir=str(runs[1]))
    x, y = task.test.batch(np.arange(4))
    calib, _ = task.train.batch(np.arange(4))
    sweep = noise_sweep({"m": S4DModel.load(root / "float" / "best_model")}, x, y, "crossbar", [0.3], seeds=2,
                        batch_size=2, base_config=config, calib=calib, read_noise="output")
    assert [r["accuracy"] for r in meta["records"]] == sweep["m"]["runs"][0]


@pytest.mark.parametrize("extra, message", [
    (["--sigma", "-0.1"], "--sigma: expected a finite number >= 0"),
    (["--sigma", "0.1", "--protocol", "gauss"], "--protocol: invalid choice"),
    (["--sigma", "0.1", "--targets", "E"], "--targets: invalid choice"),
    (["--sigma", "0.1", "--protocol", "crossbar", "--targets", "A"], "crossbar read noise reaches every array"),
    (["--sigma", "0.1", "--calib-batches", "2", "--read-noise", "output"],
     "--calib-batches, --read-noise apply to --protocol crossbar, not qs4d"),
    (["--sigma", "0.1", "--protocol", "crossbar", "--analog", "nowhere.json"], "--analog nowhere.json: no such file"),
    (["--sigma", "0.1", "--protocol", "crossbar", "--read-noise", "input"], "--read-noise: invalid choice"),
])
def test_flag_errors_are_one_line(runs, tmp_path, capsys, extra, message):
    root, _ = runs
    code = None
    try:
        code = main(["noise", "--checkpoint", str(root / "float"), *extra, "--out", str(tmp_path / "o")])
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code in (1, 2)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_missing_checkpoint_and_missing_target(runs, tmp_path, capsys):
    root, _ = runs
    assert main(["noise", "--checkpoint", str(tmp_path / "nope"), "--sigma", "0.1", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model at" in err
    no_mixing = S4DModel(**{**S4DModel.load(root / "float" / "best_model").config, "mixing": None})
    no_mixing.save(tmp_path / "plain")
    assert main(["noise", "--checkpoint", str(tmp_path / "plain"), "--sigma", "0.1", "--targets", "linear",
                 "--dataset", "smnist", "--data-dir", str(runs[1]), "--limit-test", "2",
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'linear'" in err and "no mixing" in err
    assert not (tmp_path / "o").exists()


def test_train_refuses_a_noise_target_the_model_lacks(runs, tmp_path, capsys):
    _, data = runs
    assert main(["train", "--data-dir", str(data), *TINY, "--epochs", "1", "--abar", "discrete", "--mode",
                 "recurrent", "--noise", "0.1", "--noise-targets", "A", "dt", "--out", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'dt'" in err and "discrete" in err
    assert not (tmp_path / "t" / "last.json").exists()
