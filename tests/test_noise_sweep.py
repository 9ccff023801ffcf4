"""Noise studies: zero noise gives the clean accuracy, seeds reproduce, noise hurts, bad input."""
import numpy as np
import pytest

from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.robustness import accuracy_under_noise, noise_sweep
from qs4d_np.models.s4d_model import S4DModel

TINY = dict(d_model=6, d_state=8, n_layers=1, dropout=0.0)


def _setup(seed=0):
    model = S4DModel(2, 3, seed=seed, **TINY)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40, 8, 2)).astype(np.float32)
    # labels the clean model gets right, so any accuracy loss is the noise's
    y = np.argmax(model.forward(x, mode="recurrent"), axis=1)
    return model, x, y


@pytest.mark.parametrize("kind", ["A", "weights", "read"])
def test_zero_noise_is_clean_and_large_noise_hurts(kind):
    model, x, y = _setup()
    rng = np.random.default_rng(0)
    assert accuracy_under_noise(model, x, y, kind, 0.0, rng, batch_size=16) == 1.0
    # the noisy paths leave the model's weights untouched
    before = {k: v.copy() for k, v in model.params.items()}
    noisy = accuracy_under_noise(model, x, y, kind, 2.0, rng, batch_size=16)
    assert noisy < 1.0
    assert all(np.array_equal(v, before[k]) for k, v in model.params.items())


def test_sweep_shapes_seeds_and_reproducibility():
    model, x, y = _setup(1)
    other = S4DModel(2, 3, seed=2, **TINY)
    sigmas = [0.0, 0.05, 0.5]
    a = noise_sweep({"m": model, "o": other}, x, y, "weights", sigmas, seeds=3, batch_size=20)
    b = noise_sweep({"m": model, "o": other}, x, y, "weights", sigmas, seeds=3, batch_size=20)
    assert a == b
    m = a["m"]
    assert m["sigma"] == sigmas and len(m["runs"]) == 3 and all(len(r) == 3 for r in m["runs"])
    assert m["mean"][0] == 1.0 and m["std"][0] == 0.0
    assert m["mean"][2] < 1.0
    np.testing.assert_allclose(m["mean"], [np.mean(r) for r in m["runs"]])
    np.testing.assert_allclose(m["std"], [np.std(r) for r in m["runs"]])
    c = noise_sweep({"m": model}, x, y, "weights", sigmas, seeds=3, seed=1, batch_size=20)
    assert c["m"]["runs"][2] != m["runs"][2]


def test_read_noise_sweep_uses_the_base_config():
    model, x, y = _setup(3)
    out = noise_sweep({"m": model}, x[:8], y[:8], "read", [0.0], seeds=2,
                      base_config=CrossbarConfig(dac_bits=2, adc_bits=2))
    # 2-bit converters alone wreck the model: the base config is in effect
    assert out["m"]["mean"][0] < 1.0


def test_bad_input_is_named():
    model, x, y = _setup()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kind must be one of"):
        accuracy_under_noise(model, x, y, "drift", 0.1, rng)
    with pytest.raises(ValueError, match="sigma must be >= 0.0"):
        accuracy_under_noise(model, x, y, "A", -0.1, rng)
    with pytest.raises(ValueError, match=r"y must have shape \(40,\)"):
        accuracy_under_noise(model, x, y[:3], "A", 0.1, rng)
    with pytest.raises(ValueError, match=r"sigmas\[1\] must be >= 0.0"):
        noise_sweep({"m": model}, x, y, "A", [0.0, -1.0])
    with pytest.raises(ValueError, match="sigmas must hold at least one"):
        noise_sweep({"m": model}, x, y, "A", [])
    with pytest.raises(ValueError, match="models must be a non-empty mapping"):
        noise_sweep({}, x, y, "A", [0.0])
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        noise_sweep({"m": model}, x, y, "A", [0.0], seeds=0)
