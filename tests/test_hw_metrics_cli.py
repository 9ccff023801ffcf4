"""``qs4d metrics``: the reference's logged values in compat mode, checkpoints with pruned parts,
JSON output, bad flags (exit 2) and missing files (exit 1)."""
import json

import numpy as np
import pytest

from qs4d_np.cli.main import main
from qs4d_np.hardware.pruning import prune_magnitude
from qs4d_np.models.s4d_model import S4DModel


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compat_reproduces_the_reference_log(capsys):
    code, out, _ = _run(capsys, "metrics", "--d_model", "128", "--d_state", "128", "--n_layers", "4",
                        "--bits", "12", "--compat", "qs4d")
    assert code == 0
    for value in ("132,323,328", "28,514,304", "2,362,368", "800,376"):
        assert value in out
    code, out, _ = _run(capsys, "metrics", "--d_model", "128", "--d_state", "128", "--n_layers", "4",
                        "--bits", "12", "--json")
    table = json.loads(out)
    # the corrected decoder term: H * d_out * r_coder instead of H * d_in * r_coder
    assert table["formulas"]["model_size_bits"]["quantized"] == 2_362_368 + 128 * 9 * 12


def test_checkpoint_with_pruned_channels(tmp_path, capsys):
    model = S4DModel(1, 10, d_model=8, d_state=6, n_layers=2, dropout=0.0, seed=0)
    model.save(tmp_path / "full")
    prune_magnitude(model, 0.25, "channel").apply(model)
    model.save(tmp_path / "pruned")
    tables = []
    for name in ("full", "pruned.json"):
        code, out, err = _run(capsys, "metrics", "--checkpoint", str(tmp_path / name), "--bits", "8", "--json")
        assert code == 0, err
        tables.append(json.loads(out))
    full, pruned = (t["datapath"] for t in tables)
    # 2 of 8 channels per layer: each had N + 1 = 7 conversions per step
    assert full["adc_conversions"]["quantized"] - pruned["adc_conversions"]["quantized"] == 2 * 2 * 7
    # the formulas see only the shape
    assert tables[0]["formulas"] == tables[1]["formulas"]
    code, out, _ = _run(capsys, "metrics", "--checkpoint", str(tmp_path / "full"))
    assert code == 0 and "A=32" in out and "1.00x" in out  # a float model: no reduction


@pytest.mark.parametrize("argv,match", [
    (["--bits", "0"], "argument --bits"),
    (["--bits", "33"], "expected bits in 1..32"),
    (["--d_state", "7"], "expected an even state size"),
    (["--compat", "paper"], "argument --compat"),
    (["--checkpoint", "x", "--d_model", "4"], "--d_model cannot be combined with --checkpoint"),
])
def test_bad_flags_exit_2(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(["metrics", *argv])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_missing_checkpoint_exits_1(tmp_path, capsys):
    code, out, err = _run(capsys, "metrics", "--checkpoint", str(tmp_path / "nothing"))
    assert code == 1 and "no model at" in err and "Traceback" not in err
