"""Noise studies: zero noise gives the clean accuracy, seeds reproduce, noise hurts, records, bad input."""
import dataclasses

import numpy as np
import pytest

from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.convert import evaluate_analog
from qs4d_np.hardware.robustness import accuracy_under_noise, noise_sweep, sweep_records
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.config import QuantConfig

TINY = dict(d_model=6, d_state=8, n_layers=1, dropout=0.0)
CASES = [("qs4d", ("A",)), ("absmax", ("C", "linear", "coder")), ("crossbar", None)]


def _setup(seed=0):
    model = S4DModel(2, 3, seed=seed, **TINY)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40, 8, 2)).astype(np.float32)
    # labels the clean model gets right, so any accuracy loss is the noise's
    y = np.argmax(model.forward(x, mode="recurrent"), axis=1)
    return model, x, y


@pytest.mark.parametrize("protocol,targets", CASES)
def test_zero_noise_is_clean_and_large_noise_hurts(protocol, targets):
    model, x, y = _setup()
    rng = np.random.default_rng(0)
    kw = dict(targets=targets, batch_size=16, mode="recurrent")
    assert accuracy_under_noise(model, x, y, protocol, 0.0, rng, **kw) == 1.0
    before = {k: v.copy() for k, v in model.params.items()}
    assert accuracy_under_noise(model, x, y, protocol, 2.0, rng, **kw) < 1.0
    assert all(np.array_equal(v, before[k]) for k, v in model.params.items())  # weights untouched


def test_sweep_shapes_seeds_reproducibility_and_records():
    model, x, y = _setup(1)
    other = S4DModel(2, 3, seed=2, **TINY)
    sigmas = [0.0, 0.05, 2.0]
    kw = dict(targets=("A", "C"), seeds=3, batch_size=20)
    a = noise_sweep({"m": model, "o": other}, x, y, "qs4d", sigmas, **kw)
    b = noise_sweep({"m": model, "o": other}, x, y, "qs4d", sigmas, **kw)
    assert a == b
    m = a["m"]
    assert m["sigma"] == sigmas and len(m["runs"]) == 3 and all(len(r) == 3 for r in m["runs"])
    assert m["mean"][0] == 1.0 and m["std"][0] == 0.0 and m["mean"][2] < 1.0
    assert m["nonfinite"] == [[0, 0, 0]] * 3
    np.testing.assert_allclose(m["mean"], [np.mean(r) for r in m["runs"]])
    np.testing.assert_allclose(m["std"], [np.std(r) for r in m["runs"]])
    c = noise_sweep({"m": model}, x, y, "qs4d", sigmas, **{**kw, "seed": 1})
    assert c["m"]["runs"][2] != m["runs"][2]
    records = sweep_records(a)
    assert len(records) == 2 * 3 * 3
    assert records[4] == {"checkpoint": "m", "sigma": 0.05, "seed": 1, "stream": [0, 1],
                          "accuracy": m["runs"][1][1], "nonfinite": 0}


def test_a_noise_free_level_runs_the_model_once_and_counts_for_every_seed():
    model, x, y = _setup(3)
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    sweep = noise_sweep({"m": model}, x, y, "qs4d", [0.0, 0.1], seeds=4, batch_size=20)
    assert len(calls) == 2 + 4 * 2  # sigma 0: one pass of 2 batches; sigma 0.1: 4 seeds of 2 batches
    assert sweep["m"]["runs"][0] == [1.0] * 4 and sweep["m"]["std"][0] == 0.0


def test_a_nonfinite_forward_counts_as_wrong_and_is_reported():
    model, x, y = _setup(4)
    model.params["decoder.weight"][...] = 3e38  # the decoder overflows float32 on some batches
    with np.errstate(over="ignore"):
        out = noise_sweep({"m": model}, x, y, "absmax", [0.0], targets=("C",), seeds=1, batch_size=10)
    lost = out["m"]["nonfinite"][0][0]
    assert lost > 0 and lost % 10 == 0  # whole batches
    assert out["m"]["runs"][0][0] <= 1 - lost / 40


def test_a_diverging_quantized_state_counts_as_wrong_instead_of_stopping_the_sweep():
    # an absmax state quantizer takes its range from the float state of the batch: noise that
    # pushes |Abar| far past 1 makes that range overflow float64 over a long sequence (|Abar| ~ 30)
    model = S4DModel(2, 3, seed=5, quant=QuantConfig(256), mode="recurrent", **TINY)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 784, 2)).astype(np.float32)
    y = np.argmax(model.forward(x), axis=1)
    with np.errstate(all="ignore"):
        out = noise_sweep({"m": model}, x, y, "absmax", [0.0, 30.0], seeds=2, batch_size=10)
    assert out["m"]["runs"][0] == [1.0, 1.0]
    assert all(lost > 0 and lost % 10 == 0 for lost in out["m"]["nonfinite"][1])


def test_crossbar_sweep_uses_the_base_config():
    model, x, y = _setup(3)
    out = noise_sweep({"m": model}, x[:8], y[:8], "crossbar", [0.0], seeds=2,
                      base_config=CrossbarConfig(dac_bits=2, adc_bits=2))
    assert out["m"]["mean"][0] < 1.0  # 2-bit converters alone wreck the model: the base config is in effect


def test_crossbar_sweep_calibrates_and_sets_the_read_noise_it_names():
    model, x, y = _setup(3)
    base = CrossbarConfig(dac_bits=8, adc_bits=10, noise_management="none", bound_management=False)
    calib = x[24:]
    out = noise_sweep({"m": model}, x[:24], y[:24], "crossbar", [0.3], seeds=2, base_config=base, calib=calib,
                      read_noise="output")
    # run r is evaluate_analog with out_noise = sigma, the sweep's calibration and the run's seed
    for r, acc in enumerate(out["m"]["runs"][0]):
        seed = int(np.random.default_rng([0, r]).integers(0, 2 ** 63))
        calibrated, common = (evaluate_analog(model, x[:24], y[:24], dataclasses.replace(base, out_noise=0.3),
                                              seed=seed, calib=c, state_bound=1e4)["accuracy"] for c in (calib, None))
        assert acc == calibrated != common  # the same run, and its calibration is in effect
    noisy = accuracy_under_noise(model, x, y, "crossbar", 0.5, np.random.default_rng(0), base_config=base,
                                 calib=calib, read_noise="output")
    assert noisy < accuracy_under_noise(model, x, y, "crossbar", 0.0, np.random.default_rng(0), base_config=base,
                                        calib=calib, read_noise="output")
    with pytest.raises(ValueError, match="read_noise must be one of"):
        noise_sweep({"m": model}, x, y, "crossbar", [0.1], read_noise="input")
    with pytest.raises(ValueError, match="apply to the crossbar protocol, not 'qs4d'"):
        noise_sweep({"m": model}, x, y, "qs4d", [0.1], calib=calib)


def test_bad_input_is_named():
    model, x, y = _setup()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="protocol must be one of"):
        accuracy_under_noise(model, x, y, "drift", 0.1, rng)
    with pytest.raises(ValueError, match="sigma must be >= 0.0"):
        accuracy_under_noise(model, x, y, "qs4d", -0.1, rng)
    with pytest.raises(ValueError, match=r"y must have shape \(40,\)"):
        accuracy_under_noise(model, x, y[:3], "qs4d", 0.1, rng)
    with pytest.raises(ValueError, match="targets entry"):
        accuracy_under_noise(model, x, y, "qs4d", 0.1, rng, targets=("E",))
    with pytest.raises(ValueError, match="crossbar read noise reaches every array"):
        accuracy_under_noise(model, x, y, "crossbar", 0.1, rng, targets=("A",))
    with pytest.raises(ValueError, match="runs the model recurrently"):
        accuracy_under_noise(model, x, y, "crossbar", 0.1, rng, mode="conv")
    with pytest.raises(ValueError, match=r"sigmas\[1\] must be >= 0.0"):
        noise_sweep({"m": model}, x, y, "qs4d", [0.0, -1.0])
    with pytest.raises(ValueError, match="sigmas must hold at least one"):
        noise_sweep({"m": model}, x, y, "qs4d", [])
    with pytest.raises(ValueError, match="models must be a non-empty mapping"):
        noise_sweep({}, x, y, "qs4d", [0.0])
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        noise_sweep({"m": model}, x, y, "qs4d", [0.0], seeds=0)
    with pytest.raises(ValueError, match="'linear'.*no mixing"):  # checked before any model runs
        noise_sweep({"m": model, "n": S4DModel(2, 3, mixing=None, **TINY)}, x, y, "qs4d", [0.0],
                    targets=("linear",))
