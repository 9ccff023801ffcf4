"""Post-training quantization: with_quant, calibrate, ptq, ptq_sweep."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant import QuantConfig, Quantizer
from qs4d_np.train.ptq import calibrate, ptq, ptq_sweep, with_quant

TINY = dict(d_model=4, d_state=4, n_layers=2, dropout=0.1, norm="batch", dtype=np.float64, seed=2)


def trained_like(seed=0):
    """A float model whose norms have non-default running statistics (as after training)."""
    model = S4DModel(2, 3, **TINY)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        model.forward(rng.standard_normal((4, 7, 2)), training=True)
    return model


def batches(n=3, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((4, 7, 2)) for _ in range(n)]


def accuracy_on(x, labels, mode="conv"):
    return lambda m: float(np.mean(np.argmax(m.forward(x, mode=mode), axis=1) == labels))


def test_with_quant_copies_the_float_model():
    model = trained_like()
    x = batches(1, seed=9)[0]
    same = with_quant(model, None)
    assert same is not model and same.quant is None
    assert np.array_equal(same.forward(x), model.forward(x))  # weights and BatchNorm statistics copied
    fine = with_quant(model, QuantConfig(all=2**30, target_options={"act": {"scale_mode": "running"}}))
    calibrate(fine, [x])  # ranges covering x: no saturation, so only the 2**30-state rounding remains
    np.testing.assert_allclose(fine.forward(x), model.forward(x), rtol=1e-6, atol=1e-7)
    coarse = with_quant(model, QuantConfig(all=8))
    assert not np.allclose(coarse.forward(x), model.forward(x), atol=1e-3)
    assert coarse.config["quant"] == QuantConfig(all=8).to_dict()
    # the source keeps working unchanged
    assert np.array_equal(same.forward(x), model.forward(x))


@pytest.mark.parametrize("abar", ["discrete", "frozen"])
def test_with_quant_changes_the_abar_parameterization(abar):
    model = trained_like()
    x = batches(1, seed=9)[0]
    new = with_quant(model, None, abar=abar)
    assert new.config["abar"] == abar
    for mode in ("conv", "recurrent"):
        np.testing.assert_allclose(new.forward(x, mode=mode), model.forward(x, mode=mode), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="cannot rebuild"):
        with_quant(new, None, abar="continuous")


def test_with_quant_initialises_learned_steps_from_the_copied_weights():
    model = trained_like()
    cfg = QuantConfig(C=16, target_options={"C": {"scale_mode": "learned"}})
    new = with_quant(model, cfg)
    C = model.params["layers.0.ssm.C"]
    expected = 2 * np.mean(np.concatenate([np.abs(C.real).ravel(), np.abs(C.imag).ravel()])) * np.sqrt(7) / 7
    np.testing.assert_allclose(new.params["layers.0.ssm.quant_C.step"], expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["conv", "recurrent"])
def test_calibrate_records_ranges_then_freezes_them(mode):
    model = trained_like()
    q = ptq(model, QuantConfig(all=64, target_options={"act": {"scale_mode": "running"},
                                                       "state": {"scale_mode": "running"}}), batches(), mode=mode)
    running = {n: m for n, m in q.modules() if isinstance(m, Quantizer) and m.scale_mode == "running"}
    used = {n for n, m in running.items() if m.calibrated}
    assert {n for n in running if n.endswith("quant_act")} <= used
    assert any(n.endswith("quant_x" if mode == "recurrent" else "quant_u") for n in used)
    before = {n: dict(m.buffers) for n, m in running.items() if m.calibrated}
    x = batches(1, seed=5)[0]
    out = q.forward(x, mode=mode)
    # no batch dependence (only BLAS blocking rounding, far below one quantization step)
    np.testing.assert_allclose(q.forward(x[:1], mode=mode)[0], out[0], rtol=1e-12, atol=1e-14)
    for n, b in before.items():  # evaluation does not move the ranges
        assert all(np.array_equal(running[n].buffers[k], v) for k, v in b.items())
    assert not any(m.calibrating for m in running.values())
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(q, [])


def test_ptq_sweep_rows_and_the_float_limit():
    model = trained_like()
    rng = np.random.default_rng(3)
    x, labels = rng.standard_normal((16, 7, 2)), rng.integers(0, 3, 16)
    evaluate = accuracy_on(x, labels)
    # Calibrated on the evaluation data itself, so no activation leaves its static range: then
    # 2**20 states must reproduce the float accuracy (saturation on unseen data is PTQ's own error).
    rows = ptq_sweep(model, ["all", "C", "state"], [3, 20], [x[:8], x[8:]], evaluate)
    assert [(r["target"], r["bits"]) for r in rows] == [(t, b) for t in ("all", "C", "state") for b in (3, 20)]
    assert all(r["levels"] == 2 ** r["bits"] and r["grid"] == "narrow" for r in rows)
    float_acc = evaluate(model)
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        if r["bits"] == 20:
            assert r["accuracy"] == float_acc, r
    rec = ptq_sweep(model, ["all"], [20], [x], accuracy_on(x, labels, "recurrent"), mode="recurrent", grid="qs4d",
                    per_channel=True)
    assert rec[0]["grid"] == "qs4d" and rec[0]["accuracy"] == float_acc
    seen = []
    ptq_sweep(model, ["C"], [4], [x], lambda m: seen.append(m.blocks[0].ssm.q["C"].n_scales) or 0.0,
              per_channel=True)
    assert seen == [4]  # one scale per channel (d_model = 4)


def test_ptq_sweep_bad_input():
    model = trained_like()
    ev = lambda m: 0.0  # noqa: E731
    with pytest.raises(ValueError, match="target must be one of"):
        ptq_sweep(model, ["mixing"], [4], batches(1), ev)
    with pytest.raises(ValueError, match="bits\\[0\\] must be >= 1"):
        ptq_sweep(model, ["all"], [0], batches(1), ev)
    with pytest.raises(ValueError, match="bits=1 .*levels=2 on the symmetric narrow grid"):
        ptq_sweep(model, ["C"], [4, 1], batches(1), ev)
    with pytest.raises(ValueError, match="calibration batch"):
        ptq_sweep(model, ["all"], [4], [], ev)
    with pytest.raises(ValueError, match="grid must be one of"):
        ptq_sweep(model, ["all"], [4], batches(1), ev, grid="wide")
    with pytest.raises(TypeError, match="per_channel must be True or False, got 1"):
        ptq_sweep(model, ["all"], [4], batches(1), ev, per_channel=1)
    with pytest.raises(TypeError, match="quant must be a QuantConfig"):
        with_quant(model, {"all": 4})


@pytest.mark.parametrize("name", ["calibrate", "ptq", "ptq_sweep", "with_quant"])
def test_the_old_quant_paths_are_deprecated_aliases(name):
    """``from qs4d_np.quant import NAME`` and ``from qs4d_np.quant.ptq import NAME`` still give the PTQ
    functions, now in qs4d_np.train.ptq, with a DeprecationWarning naming that path."""
    import qs4d_np.quant
    import qs4d_np.train.ptq as new_home

    old_module = sys.modules["qs4d_np.quant.ptq"]
    for old, where in ((qs4d_np.quant, "qs4d_np.quant"), (old_module, "qs4d_np.quant.ptq")):
        with pytest.warns(DeprecationWarning, match=rf"{where}\.{name} is deprecated: import {name} from "
                                                    r"qs4d_np\.train\.ptq"):
            assert getattr(old, name) is getattr(new_home, name)
    with pytest.warns(DeprecationWarning, match="qs4d_np.quant.ptq.sweep_config is deprecated"):
        from qs4d_np.quant.ptq import sweep_config
    assert sweep_config is new_home.sweep_config
    with pytest.raises(AttributeError, match="module 'qs4d_np.quant' has no attribute 'ptq_grid'"):
        qs4d_np.quant.ptq_grid


def test_importing_quant_does_not_import_ptq():
    """The aliases resolve lazily: importing quant (as the models do) loads neither train nor train.ptq."""
    code = ("import sys, qs4d_np.quant, qs4d_np.quant.ptq; "
            "print(sorted(m for m in sys.modules if m.startswith('qs4d_np.train')))")
    root = str(Path(__file__).resolve().parents[1])  # this checkout, not an installed copy
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"
