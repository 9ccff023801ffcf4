"""The example scripts in smoke configurations (tiny data and models through their flags)."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from qs4d_np.cli.common import load_model
from qs4d_np.data.cifar import RECORD_BYTES
from qs4d_np.io import load_json
from qs4d_np.models.s4d_model import S4DModel
from test_cli import write_tiny_mnist

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through the module's entry
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


def test_smnist_demo_machinery_in_a_smoke_configuration(tmp_path, capsys):
    demo = _example("smnist_qat")
    data = write_tiny_mnist(tmp_path / "idx")
    figure, work = tmp_path / "fig" / "demo.png", tmp_path / "work"
    assert demo.main(["--data-dir", str(data), "--n_layers_m", "1", "--d_model_m", "8", "--d_state", "4",
                      "--epochs", "1", "--batch_size", "16", "--ptq-bits", "2", "4", "--qat-bits", "4",
                      "--qat-epochs", "1", "--work-dir", str(work), "--out", str(figure), "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = load_json(figure.with_suffix(".json"))
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert [(r["target"], r["bits"]) for r in results["ptq"]] == [("all", 2), ("all", 4)]
    assert [(r["target"], r["bits"]) for r in results["qat"]] == [("all", 4)]
    # the numbers are the runs' own: the QAT row is its run's test accuracy, float the float run's
    assert results["qat"][0]["accuracy"] == load_json(work / "qat4" / "results.json")["test_acc"]
    assert results["float_accuracy"] == pytest.approx(load_json(work / "float" / "results.json")["test_acc"])
    assert load_model(work / "qat4").config["quant"]["all"] == 16
    assert demo.table(results) in printed and "| 4 |" in printed


def test_streaming_example_streams_digits_and_checks_against_the_forward(tmp_path, capsys):
    streaming = _example("streaming")
    data = write_tiny_mnist(tmp_path / "idx")
    S4DModel.from_preset("qs4d", 1, 10, d_model=4, d_state=4, n_layers=1, seed=0).save(tmp_path / "tiny")
    argv = ["--data-dir", str(data), "--checkpoint", str(tmp_path / "tiny"), "--digits", "2", "--prints", "3"]
    assert streaming.main(argv) == 0
    assert streaming.main(argv + ["--bits", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("  784  100%") == 2 and "8-bit PTQ" in out and out.count("max relative difference") == 2
    assert streaming.main(["--random", "--length", "12", "--digits", "1", "--prints", "2"]) == 0
    assert "   12  100%" in capsys.readouterr().out
    assert streaming.main(["--data-dir", str(tmp_path / "nothing"), "--digits", "1"]) == 1
    assert "streaming.py: error:" in capsys.readouterr().err


def test_hardware_studies_example_in_its_fast_configuration(tmp_path, capsys):
    studies = _example("hardware_studies")
    data = write_tiny_mnist(tmp_path / "idx")
    work, out = tmp_path / "work", tmp_path / "fig"
    argv = ["--fast", "--data-dir", str(data), "--work-dir", str(work), "--out", str(out)]
    assert studies.main(argv) == 0
    results = load_json(out / "hardware_studies.json")
    plan = studies.FAST
    # every model is an ordinary qs4d run with the recipe's quantization, and its accuracy is the run's own
    assert set(results["runs"]) == {"float", f"QAT {plan.bits[0]} bit", f"conv QAT {plan.conv_bits[0]} bit"}
    qat = load_model(work / f"qat{plan.bits[0]}")
    assert qat.config["quant"]["all"] == 2 ** plan.bits[0] and qat.mode == "recurrent"
    assert load_model(work / f"conv{plan.conv_bits[0]}").mode == "conv"
    assert results["test_accuracy"]["float"] == load_json(work / "float" / "results.json")["test_acc"]
    # the sweeps hold every (model, sigma, seed) of the plan, summarized from the CLI's own records
    records = load_json(work / "noise_A" / "noise.json")["records"]
    assert len(records) == 2 * len(plan.sigmas) * plan.seeds
    curves = results["noise"]["noise_A"]
    for label, curve in curves.items():
        assert curve["sigma"] == list(plan.sigmas)
        for i, sigma in enumerate(plan.sigmas):
            accs = [r["accuracy"] for r in records if (r["checkpoint"], r["sigma"]) == (results["runs"][label], sigma)]
            assert len(accs) == plan.seeds
            assert (curve["mean"][i], curve["std"][i]) == pytest.approx((np.mean(accs), np.std(accs)))
    verdict = results["verdicts"]["noise_A"]
    assert verdict["holds"] in ("yes", "no", "within noise", "no high-noise level",
                                "no model within 10 points of float")
    # pruning: kernel fractions are multiples of 1/H, for both methods and both models
    for method, verdict in results["verdicts"]["pruning"].items():
        for fractions in verdict["kernel_fractions"].values():
            assert all(abs(f * plan.d_model - round(f * plan.d_model)) < 1e-12 for f in fractions)
    assert set(results["noise"]["noise_A_conv"]) == {"float", f"conv QAT {plan.conv_bits[0]} bit"}
    for name in ("noise_A.png", "noise_A_conv.png", "noise_crossbar.png", "pruning.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # a second run reuses every stage (same command lines) and gives the same numbers
    capsys.readouterr()
    assert studies.main(argv) == 0
    printed = capsys.readouterr().out
    assert "$ qs4d" not in printed and printed.count("reusing") == 3 + 3 + 4
    again = load_json(out / "hardware_studies.json")
    assert again["noise"] == results["noise"] and again["verdicts"] == results["verdicts"]


def test_analog_imssa_example_on_a_tiny_qat_run(tmp_path, capsys):
    """The IMSSA example end to end on the committed 1-layer 16-level QAT run (its state quantized)."""
    example = _example("analog_imssa")
    run = Path(__file__).resolve().parent / "data" / "compat" / "run_qat16"
    out = tmp_path / "analog.json"
    argv = ["--checkpoint", str(run), "--calib", "4", "--limit-test", "3", "--seeds", "2", "--batch_size", "3",
            "--out", str(out)]
    assert example.main(argv) == 0
    printed = capsys.readouterr().out
    result = load_json(out)
    assert result["test_samples"] == 3 and result["calib_samples"] == 4
    assert "float32 vs its float64 twin" in printed and 0.0 <= result["digital_float64_agreement"] <= 1.0
    assert set(result["configs"]) == set(example.CONFIGS)
    for name, (cfg, noisy) in example.CONFIGS.items():
        entry = result["configs"][name]
        assert entry["seeds"] == (2 if noisy else 1) and len(entry["runs"]) == entry["seeds"]
        assert entry["crossbar"] == cfg.to_dict()
        for r in entry["runs"]:
            assert r["samples"] == 3 and 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0
        assert name in printed
    # the twin is the same model in float64: same weights, quantizers and ranges
    model = example.static_ranges(load_model(run), [np.zeros((4, 784, 1), np.float32)])
    twin = example.float64_twin(model)
    assert twin.dtype == np.float64 and model.config["quant"] == twin.config["quant"]
    for name, value in model.state_arrays().items():
        np.testing.assert_array_equal(twin.state_arrays()[name], value.astype(np.result_type(value, np.float64)))
