"""The ``qs4d`` command line end to end on a tiny synthetic MNIST-format dataset (IDX files in tmp)."""
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from qs4d_np.cli.main import main
from qs4d_np.data.idx import write_idx
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.train.checkpoint import load_checkpoint

TINY = ["--n_layers_m", "2", "--d_model_m", "8", "--d_state", "4", "--batch_size", "16", "--quiet"]


def write_tiny_mnist(folder):
    """60 training and 20 test 'digits' as IDX files: noise plus one bright row whose position encodes the label."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 20)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
        images[np.arange(n), 2 * labels + 3, :] = 255
        write_idx(folder / f"{split}-images-idx3-ubyte", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("idx"))


def _train(data_dir, out, *extra):
    return main(["train", "--data-dir", str(data_dir), *TINY, "--out", str(out), *extra])


def _last_arrays(run):
    return load_checkpoint(run, "last")[0]


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_train_eval_plot(data_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "float"
    assert _train(data_dir, run, "--epochs", "2") == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["epochs"] == 2 and 0.0 <= results["test_acc"] <= 1.0
    for name in ("last.json", "best.json", "best_model.json", "best_model.npz", "metrics.jsonl", "results.json"):
        assert (run / name).is_file(), name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    # eval finds the dataset recorded in the run and reproduces the trainer's test accuracy in both modes
    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "eval.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 20 and printed["accuracy"] == pytest.approx(results["test_acc"])
    assert json.loads((tmp_path / "eval.json").read_text()) == printed
    assert main(["eval", "--checkpoint", str(run / "best_model.json"), "--dataset", "smnist",
                 "--data-dir", str(data_dir), "--mode", "recurrent"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(results["test_acc"])

    # on ideal crossbars (no converters, no noise) the analog model computes the digital one
    from qs4d_np.hardware.config import CrossbarConfig
    CrossbarConfig.ideal().save(tmp_path / "ideal.json")
    assert main(["eval", "--checkpoint", str(run), "--analog", str(tmp_path / "ideal.json")]) == 0
    analog = json.loads(capsys.readouterr().out)
    assert analog["accuracy"] == pytest.approx(results["test_acc"]) and analog["arrays"] > 0

    # PTQ sweep: one row per (target, bits), CSV and JSON agree
    ptq_dir = tmp_path / "ptq"
    assert main(["ptq", "--checkpoint", str(run), "--bits", "2", "8", "--targets", "all", "A",
                 "--out", str(ptq_dir)]) == 0
    capsys.readouterr()
    table = json.loads((ptq_dir / "ptq.json").read_text())
    assert [(r["target"], r["bits"], r["levels"]) for r in table["ptq"]] == [
        ("all", 2, 4), ("all", 8, 256), ("A", 2, 4), ("A", 8, 256)]
    assert table["float_accuracy"] == pytest.approx(results["test_acc"])
    csv_lines = (ptq_dir / "ptq.csv").read_text().splitlines()
    assert csv_lines[0] == "target,bits,levels,grid,granularity,accuracy" and len(csv_lines) == 5
    assert csv_lines[1] == f"all,2,4,narrow,tensor,{table['ptq'][0]['accuracy']}"
    # one scale per channel reaches the sweep
    ptq_module = importlib.import_module("qs4d_np.train.ptq")
    real_sweep, seen = ptq_module.ptq_sweep, []

    def recording_sweep(*args, **kwargs):
        seen.append(kwargs["per_channel"])
        return real_sweep(*args, **kwargs)
    monkeypatch.setattr(ptq_module, "ptq_sweep", recording_sweep)
    assert main(["ptq", "--checkpoint", str(run), "--bits", "2", "--targets", "C", "--granularity", "channel",
                 "--out", str(tmp_path / "ptq_channel")]) == 0
    assert seen == [True]
    capsys.readouterr()
    channel = json.loads((tmp_path / "ptq_channel" / "ptq.json").read_text())["ptq"]
    assert [(r["target"], r["bits"], r["granularity"]) for r in channel] == [("C", 2, "channel")]

    # QAT fine-tuning from the float weights, then the figure from the PTQ table and the QAT run
    qat = tmp_path / "qat4"
    assert _train(data_dir, qat, "--epochs", "1", "--init-from", str(run), "--all_quant", "16",
                  "--granularity", "channel") == 0
    capsys.readouterr()
    quant = S4DModel.load(qat / "best_model").config["quant"]
    assert quant["all"] == 16 and quant["options"]["per_channel"] is True
    assert main(["plot", str(ptq_dir / "ptq.json"), str(qat), "--out", str(tmp_path / "fig.png")]) == 0
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a float run is no QAT point
    assert main(["plot", str(run), "--out", str(tmp_path / "fig2.png")]) == 1
    assert "float run" in capsys.readouterr().err


def test_eval_analog_presets_seeds_and_config_errors(data_dir, tmp_path, capsys):
    run = tmp_path / "qat"
    assert _train(data_dir, run, "--epochs", "1", "--all_quant", "256") == 0
    capsys.readouterr()
    small = ["eval", "--checkpoint", str(run), "--limit-test", "6", "--calib-batches", "1", "--batch_size", "16"]
    assert main([*small, "--analog", "converters"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibrated"] and out["calib_samples"] == 16 and out["crossbar"]["adc_bits"] == 9
    for key in ("accuracy", "digital_accuracy", "agreement", "overflowed", "arrays", "adc_conversions", "adc_clipped"):
        assert key in out, key
    assert main([*small, "--analog", "realistic", "--analog-seeds", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seeds"] == [0, 1] and len(out["runs"]) == 2 and "accuracy_std" in out
    assert out["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in out["runs"]]))
    # a physical failure is an outcome, a bad config one line naming the file and the key
    (tmp_path / "loud.json").write_text(json.dumps({"out_noise": 1e30}))
    assert main([*small, "--analog", str(tmp_path / "loud.json")]) == 0
    capsys.readouterr()
    for config, message in (({"dac_bits": "7"}, "CrossbarConfig.dac_bits"), ({"dac_bits": [1, 2]}, "dac_bits"),
                            ({"out_noise": float("nan")}, "CrossbarConfig.out_noise"),
                            ({"calib_rule": "median"}, "CrossbarConfig.calib_rule"),
                            ({"dacbits": 7}, "unknown CrossbarConfig key")):
        (tmp_path / "bad.json").write_text(json.dumps(config))
        assert main([*small, "--analog", str(tmp_path / "bad.json")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("qs4d eval: error: --analog ") and message in err and len(err.splitlines()) == 1
    assert main([*small, "--analog", "noisy"]) == 1
    assert "not a preset (ideal, converters, realistic)" in capsys.readouterr().err


def test_eval_analog_static_ranges_put_the_model_state_grid_on_the_arrays(tmp_path, capsys):
    # the committed 1-layer recurrent QAT run: its state quantizer takes absmax ranges from the data
    run = Path(__file__).resolve().parent / "data" / "compat" / "run_qat16"
    config = tmp_path / "grid.json"
    CrossbarConfig(dac_bits=8, adc_bits=10, noise_management="none", bound_management=False,
                   state_grid="model").save(config)
    small = ["eval", "--checkpoint", str(run), "--limit-test", "3", "--batch_size", "4", "--analog", str(config)]
    assert main([*small, "--calib-batches", "1"]) == 1
    err = capsys.readouterr().err
    assert "needs a static state range" in err and len(err.splitlines()) == 1
    assert main([*small, "--calib-batches", "1", "--static-ranges"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["static_ranges"] is True and out["calib_samples"] == 4 and 0.0 <= out["agreement"] <= 1.0
    assert main([*small, "--calib-batches", "0", "--static-ranges"]) == 1
    assert "--static-ranges calibrates on the --calib-batches batches" in capsys.readouterr().err


def test_resume_through_the_cli_matches_an_uninterrupted_run(data_dir, tmp_path, monkeypatch, capsys):
    assert _train(data_dir, tmp_path / "straight", "--epochs", "3", "--seed", "4") == 0
    import qs4d_np.train.trainer as trainer_module
    real_write = trainer_module.atomic_write_text

    def killed_after_first_epoch(path, text):
        real_write(path, text)  # metrics.jsonl is the last file an epoch writes
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer_module, "atomic_write_text", killed_after_first_epoch)
    capsys.readouterr()
    # Ctrl-C: one line saying where the run resumes, the shell's status for SIGINT
    assert _train(data_dir, tmp_path / "resumed", "--epochs", "3", "--seed", "4") == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"interrupted: {tmp_path / 'resumed'}/last.json holds epoch 1; rerun the same command with --resume" in err
    monkeypatch.setattr(trainer_module, "atomic_write_text", real_write)
    assert load_checkpoint(tmp_path / "resumed", "last")[1]["epoch"] == 1
    assert _train(data_dir, tmp_path / "resumed", "--epochs", "3", "--seed", "4", "--resume") == 0
    straight, resumed = _last_arrays(tmp_path / "straight"), _last_arrays(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)


def test_noise_flags_change_training_and_are_seeded(data_dir, tmp_path):
    noise = ["--noise", "0.1", "--noise-targets", "A", "C", "--noise-protocol", "absmax", "--noise-eval"]
    for name, extra in (("clean", []), ("noisy", noise), ("again", noise)):
        assert _train(data_dir, tmp_path / name, "--epochs", "1", *extra) == 0
    clean, noisy, again = (_last_arrays(tmp_path / n) for n in ("clean", "noisy", "again"))
    assert not np.array_equal(clean["params/layers.0.ssm.C"], noisy["params/layers.0.ssm.C"])
    for key in noisy:
        np.testing.assert_array_equal(noisy[key], again[key], err_msg=key)
    train = load_checkpoint(tmp_path / "noisy", "last")[1]["identity"]["train"]
    assert (train["noise"], train["noise_protocol"], train["noise_targets"], train["noise_eval"]) == \
        (0.1, "absmax", ["A", "C"], True)


@pytest.mark.parametrize("argv, message", [
    (["train", "--out", "x", "--epochs", "0"], "--epochs: expected an integer >= 1"),
    (["train", "--out", "x", "--dataset", "imagenet"], "--dataset: invalid choice"),
    (["train", "--out", "x", "--all_quant", "1"], "--all_quant: expected an integer >= 2"),
    (["train", "--out", "x", "--lr", "nan"], "--lr: expected a finite number"),
    (["train", "--epochs", "1"], "the following arguments are required: --out"),
    (["ptq", "--checkpoint", "x", "--out", "y", "--targets", "everything"], "--targets: invalid choice"),
    (["eval"], "the following arguments are required: --checkpoint"),
    (["bogus"], "invalid choice"),
])
def test_bad_flags_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_runtime_errors_exit_1_and_overwrite_nothing(data_dir, tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    assert _train(missing, tmp_path / "run", "--epochs", "1") == 1
    assert f"--data-dir {missing} is not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(empty, tmp_path / "run", "--epochs", "1") == 1
    assert "has neither train-images-idx3-ubyte" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

    run = tmp_path / "float"
    assert _train(data_dir, run, "--epochs", "1") == 0
    before = _snapshot(run)
    # the same --out again without --resume, and --resume with another config
    assert _train(data_dir, run, "--epochs", "1") == 1
    assert "already holds a run" in capsys.readouterr().err
    assert _train(data_dir, run, "--epochs", "2", "--resume") == 1
    assert "train.epochs: 1 in the checkpoint, 2 now" in capsys.readouterr().err
    # --init-from a model with other architecture flags
    assert _train(data_dir, tmp_path / "ft", "--epochs", "1", "--init-from", str(run), "--d_model_m", "16") == 1
    assert "d_model=8 there, 16 asked" in capsys.readouterr().err
    assert _snapshot(run) == before and not (tmp_path / "ft").exists()

    # a checkpoint of another model: 3 input channels cannot read sequential MNIST
    S4DModel(3, 10, d_model=8, d_state=4, n_layers=1).save(tmp_path / "rgb_model")
    assert main(["eval", "--checkpoint", str(tmp_path / "rgb_model"), "--dataset", "smnist",
                 "--data-dir", str(data_dir)]) == 1
    assert "a checkpoint of another model" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing-here")]) == 1
    assert "no model at" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "rgb_model")]) == 1
    assert "no dataset: pass --dataset" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    assert main(["eval", "--checkpoint", str(tmp_path / "other.json"), "--dataset", "smnist",
                 "--data-dir", str(data_dir)]) == 1
    assert "is not an S4DModel file" in capsys.readouterr().err



def test_quant_flags_make_the_config():
    from qs4d_np.cli.common import quant_config
    from qs4d_np.cli.main import build_parser

    def config(*flags):
        return quant_config(build_parser().parse_args(["train", "--out", "x", "--all_quant", "16", *flags]))

    assert config().options_for("A")["abar_bound"] is True
    assert config("--no_abar_bound").options_for("A")["abar_bound"] is False
    assert config("--grid", "full", "--granularity", "channel").spec_for("C", axis=0).axis == 0
