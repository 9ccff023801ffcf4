"""Weight noise on a model: exact restore, configured std, sigma = 0 a no-op, bad input."""
import numpy as np
import pytest

from qs4d_np.hardware.noise import NOISE_TARGETS, noise_sites, perturbed, weight_noise
from qs4d_np.models.s4d_model import S4DModel

TINY = dict(d_model=8, d_state=8, n_layers=2, dropout=0.0)


def _model(seed=0, **kw):
    return S4DModel(2, 3, seed=seed, **{**TINY, **kw})


def _snapshot(model):
    return {k: v.copy() for k, v in model.params.items()}


def _assert_same(model, snap):
    for k, v in model.params.items():
        assert v.dtype == snap[k].dtype
        assert np.array_equal(v.view(np.uint8), snap[k].view(np.uint8)), k  # bit for bit


def test_restores_bit_exactly_and_changes_only_analog_weights():
    model = _model(norm="batch")
    snap = _snapshot(model)
    arrays = {k: id(v) for k, v in model.params.items()}
    with weight_noise(model, 0.1, np.random.default_rng(0)):
        changed = {k for k, v in model.params.items() if not np.array_equal(v, snap[k])}
        x = np.random.default_rng(1).standard_normal((2, 5, 2)).astype(np.float32)
        logits = model.forward(x, training=True)
        model.backward(np.ones_like(logits))
    _assert_same(model, snap)
    assert {k: id(v) for k, v in model.params.items()} == arrays  # same array objects (optimizers hold them)
    expected = {k for k in snap if k.endswith(("ssm.log_A_real", "ssm.A_imag", "ssm.C", "ssm.D",
                                               "mixing.linear.weight"))} | {"encoder.weight", "decoder.weight"}
    assert changed == expected


def test_restores_on_exception():
    model = _model()
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with weight_noise(model, 0.5, np.random.default_rng(0)):
            raise RuntimeError("boom")
    _assert_same(model, snap)


def test_noise_std_as_configured():
    # float64 so the measured std is not blurred by float32 rounding of the stored weights
    model = S4DModel(2, 3, d_model=64, d_state=64, n_layers=1, dropout=0.0, dtype=np.float64, seed=3)
    sigma = 0.05
    clean = {s.name: s.get() for s in noise_sites(model)}
    with weight_noise(model, sigma, np.random.default_rng(5)) as sites:
        for site in sites:
            if site.name.endswith("Re(A)"):
                continue  # Re(A) is clamped below zero; its std is checked separately below
            delta = site.get() - clean[site.name]
            expected = sigma * np.max(np.abs(clean[site.name]))
            n = delta.size
            # the sample std of n normals is within 4 standard errors (expected / sqrt(2n)) of the truth
            assert abs(delta.std() - expected) <= 4 * expected / np.sqrt(2 * n), (site.name, n)
            assert abs(delta.mean()) <= 4 * expected / np.sqrt(n), site.name


def test_A_noise_relative_to_range_real_and_imaginary_separately():
    model = S4DModel(2, 3, d_model=32, d_state=64, n_layers=1, dropout=0.0, dtype=np.float64, seed=3)
    ssm = model.blocks[0].ssm
    # a spread of decay rates so that Re(A) has a range; small sigma so no clamp happens
    ssm.params["log_A_real"][...] = np.log(np.linspace(0.5, 4.0, 32 * 32)).reshape(32, 32)
    before_re = -np.exp(ssm.params["log_A_real"].copy())
    before_im = ssm.params["A_imag"].copy()
    before_C = ssm.params["C"].copy()
    sigma = 0.01
    with perturbed(model, sigma, np.random.default_rng(2), targets=("A",), scale="range") as sites:
        assert [s.name for s in sites] == ["layers.0.ssm.Re(A)", "layers.0.ssm.A_imag"]
        d_re = -np.exp(ssm.params["log_A_real"]) - before_re
        d_im = ssm.params["A_imag"] - before_im
        assert np.array_equal(ssm.params["C"], before_C)  # only the targets named
    n = d_re.size
    for delta, clean in ((d_re, before_re), (d_im, before_im)):
        expected = sigma * (clean.max() - clean.min())
        assert abs(delta.std() - expected) <= 4 * expected / np.sqrt(2 * n)


def test_real_part_of_A_stays_negative():
    model = _model()
    with perturbed(model, 50.0, np.random.default_rng(0), targets=("A",)):
        for block in model.blocks:
            assert np.all(np.isfinite(block.ssm.params["log_A_real"]))
            d = block.ssm.discrete()
            assert np.all(np.abs(d.Abar) < 1.0)  # every mode still decays


def test_sigma_zero_is_exactly_a_no_op():
    model = _model()
    snap = _snapshot(model)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    with weight_noise(model, 0.0, rng):
        _assert_same(model, snap)
    _assert_same(model, snap)
    assert rng.bit_generator.state == state  # nothing drawn


def test_seeded_and_fresh():
    a, b = _model(), _model()
    with weight_noise(a, 0.1, np.random.default_rng(4)):
        wa = a.params["decoder.weight"].copy()
    with weight_noise(b, 0.1, np.random.default_rng(4)):
        wb = b.params["decoder.weight"].copy()
    assert np.array_equal(wa, wb)
    rng = np.random.default_rng(4)
    with weight_noise(a, 0.1, rng):
        first = a.params["decoder.weight"].copy()
    with weight_noise(a, 0.1, rng):
        second = a.params["decoder.weight"].copy()
    assert not np.array_equal(first, second)


def test_bad_input_is_named():
    model = _model()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="sigma must be >= 0.0, got -0.1"):
        with weight_noise(model, -0.1, rng):
            pass
    with pytest.raises(ValueError, match="sigma must be finite"):
        with weight_noise(model, float("nan"), rng):
            pass
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        with weight_noise(model, 0.1, 3):
            pass
    with pytest.raises(ValueError, match="targets entry must be one of"):
        with perturbed(model, 0.1, rng, targets=("B",)):
            pass
    with pytest.raises(ValueError, match="scale must be one of"):
        with perturbed(model, 0.1, rng, scale="rms"):
            pass
    with pytest.raises(TypeError, match="model must have a .params dict"):
        noise_sites(object())
    assert set(NOISE_TARGETS) == {"A", "C", "D", "linear", "coder"}
