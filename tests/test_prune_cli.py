"""``qs4d prune`` end to end on a tiny saved run: JSON, a loadable pruned model, the figure, fine-tuning."""
import json

import numpy as np
import pytest

from qs4d_np.cli.main import main
from qs4d_np.models.s4d_model import S4DModel
from test_cli import TINY, write_tiny_mnist


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prune")
    data = write_tiny_mnist(folder / "idx")
    assert main(["train", "--data-dir", str(data), *TINY, "--epochs", "1", "--out", str(folder / "run")]) == 0
    return folder / "run"


def test_prune_qs4d_with_finetuning_writes_json_model_and_figure(run, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prune", "--checkpoint", str(run), "--method", "qs4d", "--tensors", "C", "D",
                 "--tolerance", "50", "--finetune-epochs", "1", "--batch-size", "4", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "prune.json").read_text())
    assert report["method"] == "qs4d" and report["tolerance"] == 0.5 and report["tolerance_points"] == 50
    assert report["settings"] == {"batch_size": 4, "tensors": ["C", "D"], "unit": "row"}
    assert report["val_accuracy"] >= report["base_val_accuracy"] - 0.5
    assert printed["kernel_fractions"] == [entry["kernel_fraction"] for entry in report["layers"]]
    assert report["evaluations"] == 2 * (8 + 8) + 2 and len(report["record"]["tries"]) == 32
    assert report["finetune"]["epochs"] == 1 and report["finetune"]["zeros_kept"] is True
    assert 0.0 <= report["test_accuracy"] <= 1.0 and report["test_samples"] == 20
    assert (out / "finetune" / "results.json").is_file()
    assert (out / "prune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved model is the fine-tuned pruned one: its zero rows are those the report counts
    model = S4DModel.load(out / "pruned_model")
    for entry in report["layers"]:
        C = model.params[f"{entry['layer']}.ssm.C"]
        D = model.params[f"{entry['layer']}.ssm.D"]
        assert int(np.count_nonzero(~C.any(axis=1))) == entry["kernels_pruned"]
        assert int(np.count_nonzero(D == 0)) == entry["tensors"]["ssm.D"]["rows_pruned"]
    assert sum(e["kernels_pruned"] + e["tensors"]["ssm.D"]["rows_pruned"] for e in report["layers"]) > 0
    # qs4d eval reads it (a bare model file: the dataset is named)
    data = run.parent / "idx"
    assert main(["eval", "--checkpoint", str(out / "pruned_model"), "--dataset", "smnist",
                 "--data-dir", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(report["finetune"]["test_accuracy"])


def test_prune_structured_and_magnitude(run, tmp_path, capsys):
    assert main(["prune", "--checkpoint", str(run), "--method", "channels", "--chunk", "0.25",
                 "--out", str(tmp_path / "c")]) == 0
    report = json.loads((tmp_path / "c" / "prune.json").read_text())
    assert report["settings"]["granularity"] == "channel" and report["tolerance"] == 0.01
    assert all(float(e["kernel_fraction"] * 8).is_integer() for e in report["layers"])
    assert main(["prune", "--checkpoint", str(run), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(tmp_path / "m")]) == 0
    report = json.loads((tmp_path / "m" / "prune.json").read_text())
    assert report["tolerance"] is None and report["sparsity"] == 0.5
    assert all(e["tensors"]["ssm.C"]["fraction"] == 0.5 for e in report["layers"])
    capsys.readouterr()


@pytest.mark.parametrize("flags, message", [
    (["--method", "greedy"], "--method must be one of qs4d, modes, channels, magnitude, got 'greedy'"),
    (["--tolerance", "-1"], "--tolerance must be a number of accuracy points in [0, 100], got -1.0"),
    (["--method", "magnitude"], "--method magnitude needs --sparsity S"),
    (["--method", "magnitude", "--sparsity", "1.5"], "--sparsity must be a fraction in [0, 1], got 1.5"),
    (["--sparsity", "0.5"], "--sparsity only applies to --method magnitude, not qs4d"),
    (["--method", "channels", "--unit", "element"], "--unit only applies to --method qs4d, not channels"),
    (["--chunk", "0.25"], "--chunk only applies to --method modes / channels, not qs4d"),
    (["--method", "qs4d", "--granularity", "channel"], "--granularity only applies to --method magnitude, not qs4d"),
    (["--tensors", "B"], "tensors: 'B' is not a tensor of this model's S4D layers"),
])
def test_prune_errors_are_one_line(run, tmp_path, capsys, flags, message):
    assert main(["prune", "--checkpoint", str(run), *flags, "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qs4d prune: error: ") and message in err, err
    assert not (tmp_path / "x" / "prune.json").exists()


def test_prune_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["prune", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model at" in err
