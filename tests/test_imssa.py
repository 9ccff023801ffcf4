"""IMSSA mapping: the real step matrix, ideal analog inference equals the float recurrence,
counts equal the mapping formula, seeded reproducibility, pruned modes dropped, bad input."""
import dataclasses

import numpy as np
import pytest

from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.imssa import (AnalogModel, channel_matrix, evaluate_analog, mapping_counts,
                                    pack_channels)
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.config import QuantConfig

TINY = dict(d_model=6, d_state=8, n_layers=2, dropout=0.0)
ARCHS = [dict(), dict(norm="batch", residual=False, activation=None), dict(prenorm=True, pool="last"),
         dict(mixing=None, norm=None, activation="relu")]


def _x(batch=3, length=10, d_in=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, length, d_in))


def test_channel_matrix_is_the_complex_step():
    rng = np.random.default_rng(0)
    m = 5
    Abar = 0.9 * np.exp(1j * rng.uniform(0, np.pi, m))
    Bbar = rng.standard_normal(m) + 1j * rng.standard_normal(m)
    C = rng.standard_normal(m) + 1j * rng.standard_normal(m)
    D = 0.7
    M = channel_matrix(Abar, Bbar, C, D)
    x = rng.standard_normal(m) + 1j * rng.standard_normal(m)
    u = 1.3
    s = np.empty(2 * m + 1)
    s[0:-1:2], s[1:-1:2], s[-1] = x.real, x.imag, u
    out = M @ s
    x_new = Abar * x + Bbar * u
    # float64 rounding of a (2m+1)-term sum of O(1) terms
    np.testing.assert_allclose(out[0:-1:2] + 1j * out[1:-1:2], x_new, rtol=0, atol=1e-14)
    np.testing.assert_allclose(out[-1], 2 * np.sum(C * x_new).real + D * u, rtol=0, atol=1e-14)


def test_pack_channels():
    assert pack_channels([9, 9, 9, 9], 20, 20) == [(0, 2), (2, 4)]
    assert pack_channels([9, 0, 9, 9], 20, 30) == [(0, 1), (2, 4)]  # a skipped channel ends a range
    assert pack_channels([25, 3, 3], 20, 20) == [(0, 1), (1, 3)]     # too big for a tile: alone
    assert pack_channels([0, 0], 8, 8) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_ideal_analog_equals_float_recurrence(arch):
    model = S4DModel(2, 3, dtype=np.float64, seed=1, **{**TINY, **arch})
    x = _x()
    ref = model.forward(x, mode="recurrent")
    # small tiles: channels packed 2 per array and matrices split over several tiles
    analog = AnalogModel(model, CrossbarConfig.ideal(dtype="float64", tile_rows=20, tile_cols=11), seed=0)
    out = analog.forward(x)
    # float64 rounding: each output is a few hundred products of O(1) numbers, propagated over 10 steps
    # and 2 layers; 1e-12 is ~5000 eps of slack and still 10 orders below any mapping error
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_ideal_analog_float32_close_to_float_model():
    model = S4DModel(2, 3, seed=1, **TINY)
    x = _x().astype(np.float32)
    ref = model.forward(x, mode="recurrent").astype(np.float64)
    out = AnalogModel(model, CrossbarConfig.ideal(), seed=0).forward(x)
    # float32 everywhere (eps 6e-8), different summation orders: relative 1e-4 of the logit scale
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_qat_model_is_programmed_with_its_quantized_values():
    # every quantized target except the state (which the arrays' converters replace)
    quant = QuantConfig(A=16, B=16, C=16, D=16, linear=16, coder=16, act=16)
    model = S4DModel(2, 3, dtype=np.float64, seed=1, quant=quant, **TINY)
    x = _x()
    ref = model.forward(x, mode="recurrent")
    out = AnalogModel(model, CrossbarConfig.ideal(dtype="float64"), seed=0).forward(x)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)  # as in the float case
    float_model = S4DModel(2, 3, dtype=np.float64, seed=1, **TINY)
    assert np.abs(float_model.forward(x, mode="recurrent") - ref).max() > 1e-3  # the quantization matters


@pytest.mark.parametrize("tiles", [(256, 256), (20, 11), (9, 9)])
def test_counts_equal_the_mapping_formula(tiles):
    model = S4DModel(2, 3, seed=2, **TINY)
    cfg = CrossbarConfig(tile_rows=tiles[0], tile_cols=tiles[1])
    x = _x(batch=5, length=7).astype(np.float32)
    analog = AnalogModel(model, cfg, seed=0)
    analog.forward(x[:2])
    analog.forward(x[2:])
    counts = mapping_counts(model, cfg, length=7)
    assert analog.n_tiles == counts["arrays"]
    assert analog.counters.adc_conversions == 5 * counts["adc_conversions_per_sample"]
    # by hand for 256 x 256 tiles: encoder, decoder, 2 x (one SSM array for 6 blocks of 9, mixing)
    if tiles == (256, 256):
        H, n, L, layers = 6, 9, 7, 2
        assert counts["arrays"] == 2 + 2 * 2
        assert counts["adc_conversions_per_sample"] == L * (H + layers * (H * n + 2 * H)) + 3


def test_pruned_modes_drop_out_and_outputs_stay_exact():
    model = S4DModel(2, 3, dtype=np.float64, seed=3, **TINY)
    ssm = model.blocks[0].ssm
    ssm.params["C"][0, :] = 0       # channel 0: no mode left ...
    ssm.params["D"][0] = 0          # ... and no skip: the channel is not mapped
    ssm.params["C"][1, 1:3] = 0     # channel 1: two of four modes pruned
    cfg = CrossbarConfig.ideal(dtype="float64")
    x = _x()
    out = AnalogModel(model, cfg, seed=0).forward(x)
    np.testing.assert_allclose(out, model.forward(x, mode="recurrent"), rtol=0, atol=1e-12)
    full = mapping_counts(S4DModel(2, 3, dtype=np.float64, seed=3, **TINY), cfg, length=10)
    pruned = mapping_counts(model, cfg, length=10)
    # channel 0 loses its 9 conversions per step, channel 1 two modes (4 reals)
    assert full["adc_conversions_per_sample"] - pruned["adc_conversions_per_sample"] == 10 * (9 + 4)


def test_seeded_reproducibility_and_fresh_read_noise():
    model = S4DModel(2, 3, seed=4, **TINY)
    x = _x().astype(np.float32)
    cfg = CrossbarConfig.realistic()
    a = AnalogModel(model, cfg, seed=7).forward(x)
    b = AnalogModel(model, cfg, seed=7).forward(x)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, AnalogModel(model, cfg, seed=8).forward(x))
    analog = AnalogModel(model, cfg, seed=7)
    assert not np.array_equal(analog.forward(x), analog.forward(x))  # read noise redrawn per MVM
    noise_free = AnalogModel(model, CrossbarConfig(), seed=7)
    assert np.array_equal(noise_free.forward(x), noise_free.forward(x))


def test_overflow_is_named_and_state_bound_clips():
    model = S4DModel(2, 3, seed=6, **TINY)
    ssm = model.blocks[1].ssm
    eff = ssm.effective_ssm()
    # growing modes, as programming noise can make of modes with |Abar| near 1
    ssm.effective_ssm = lambda mode="recurrent": dataclasses.replace(eff, Abar=1.5 * eff.Abar / np.abs(eff.Abar))
    x = _x(length=300).astype(np.float32)
    cfg = CrossbarConfig.ideal()
    with pytest.raises(RuntimeError, match="analog recurrence of layer 1 overflowed at step"):
        AnalogModel(model, cfg, seed=0).forward(x)  # 1.5^300 overflows float32
    out = AnalogModel(model, cfg, seed=0, state_bound=10.0).forward(x)
    assert np.all(np.isfinite(out))


def test_counts_follow_the_quantized_C_of_a_qat_model():
    # 3 levels of C on the narrow grid: codes -1, 0, 1, so small entries quantize to 0 and map no mode
    from qs4d_np.hardware.datapath import model_datapath
    from qs4d_np.hardware.imssa import active_modes
    from qs4d_np.hardware.metrics import BitWidths

    model = S4DModel(2, 3, seed=5, quant=QuantConfig(C=3), **TINY)
    C = model.blocks[0].ssm.effective_ssm().C
    assert 0 < np.count_nonzero(C == 0) < C.size
    x = _x(batch=4)
    cfg = CrossbarConfig.ideal()
    out = evaluate_analog(model, x, np.zeros(4, dtype=np.int64), cfg, batch_size=2)
    counts = mapping_counts(model, cfg, x.shape[1])
    assert out["arrays"] == counts["arrays"]
    assert out["adc_conversions"] == 4 * counts["adc_conversions_per_sample"]
    ops = {op.name: op for op in model_datapath(model, BitWidths.uniform(8))}
    assert ops["layers.0.Abar"].copies == sum(len(m) for m in active_modes(C))


def test_evaluate_analog():
    model = S4DModel(2, 3, dtype=np.float64, seed=5, **TINY)
    x = _x(batch=7)
    labels = np.argmax(model.forward(x, mode="recurrent"), axis=1)
    out = evaluate_analog(model, x, labels, CrossbarConfig.ideal(dtype="float64"), batch_size=3)
    assert out["accuracy"] == 1.0  # ideal arrays reproduce the float predictions
    assert out["samples"] == 7
    assert out["arrays"] == mapping_counts(model, CrossbarConfig.ideal(), 10)["arrays"]
    assert out["adc_conversions"] == 7 * mapping_counts(model, CrossbarConfig.ideal(), 10)["adc_conversions_per_sample"]
    assert out["adc_clipped"] == 0 and out["samples_per_s"] > 0
    noisy = [evaluate_analog(model, x, labels, CrossbarConfig.realistic(out_noise=0.5), seed=s)
             for s in (1, 1)]
    assert noisy[0]["accuracy"] == noisy[1]["accuracy"]


def test_bad_input_is_named():
    model = S4DModel(2, 3, seed=0, **TINY)
    x = _x().astype(np.float32)
    y = np.zeros(3, dtype=np.int64)
    cfg = CrossbarConfig()
    with pytest.raises(TypeError, match="config must be a CrossbarConfig"):
        AnalogModel(model, {"out_noise": 0.1})
    with pytest.raises(TypeError, match="model must be an S4DModel"):
        AnalogModel(object(), cfg)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, length, 2\)"):
        evaluate_analog(model, x[..., :1], y, cfg)
    with pytest.raises(ValueError, match=r"y must have shape \(3,\)"):
        evaluate_analog(model, x, y[:2], cfg)
    with pytest.raises(ValueError, match=r"labels in 0..2"):
        evaluate_analog(model, x, y + 3, cfg)
    with pytest.raises(TypeError, match="integer class labels"):
        evaluate_analog(model, x, y.astype(np.float64), cfg)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_analog(model, x, y, cfg, batch_size=0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        evaluate_analog(model, x, y, cfg, seed=-1)
    with pytest.raises(ValueError, match="state_bound must be > 0.0"):
        AnalogModel(model, cfg, state_bound=0.0)
    with pytest.raises(ValueError, match="length must be >= 1"):
        mapping_counts(model, cfg, 0)
    with pytest.raises(ValueError, match="tiling is False"):
        AnalogModel(model, CrossbarConfig(tile_rows=4, tile_cols=4, tiling=False))
