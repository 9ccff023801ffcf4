"""The analog model (``hardware.to_analog``, IMSSA mapping): ideal arrays equal the digital forward,
the one-kernel recurrence equals its step-by-step twin, calibration, overflow as an outcome,
streaming, counts, pruning, drift, reproducibility and bad input."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import block_diag

from qs4d_np.hardware import CrossbarConfig, analog_parts, evaluate_analog, to_analog
from qs4d_np.hardware.analog_linear import AnalogLinear
from qs4d_np.hardware.imssa import (AnalogSSMCore, Cells, IMSSALayout, channel_matrix, mapping_counts,
                                    pack_channels, program_layer)
from qs4d_np.hardware.imssa_kernel import imssa_scan
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.config import QuantConfig
from qs4d_np.ssm.s4d import S4D
from reference import analog as ref

TINY = dict(d_model=6, d_state=8, n_layers=2, dropout=0.0)
ARCHS = [dict(), dict(norm="batch", residual=False, activation=None), dict(prenorm=True, pool="last"),
         dict(mixing=None, norm=None, activation="relu")]
# every quantized target the analog arrays reproduce (the state lives in the converters instead)
QAT = QuantConfig(A=16, B=16, C=16, D=16, linear=16, coder=16, act=16)


def _x(batch=3, length=10, d_in=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, length, d_in))


def _cores(model):
    return [p for p in analog_parts(model) if isinstance(p, AnalogSSMCore)]


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
    # delayed: the output row reads the state lines and the previous input, giving y_{t-1}
    u_prev = -0.4
    M = channel_matrix(Abar, Bbar, C, D, delayed=True)
    assert M.shape == (2 * m + 1, 2 * m + 2)
    out = M @ np.concatenate([s, [u_prev]])
    np.testing.assert_allclose(out[0:-1:2] + 1j * out[1:-1:2], x_new, rtol=0, atol=1e-14)
    np.testing.assert_allclose(out[-1], 2 * np.sum(C * x).real + D * u_prev, rtol=0, atol=1e-14)


@pytest.mark.parametrize("delayed", [False, True])
@pytest.mark.parametrize("update", ["full", "increment"])
def test_cells_are_the_channel_matrix(delayed, update):
    layer = S4D(5, 6, dtype=np.float64, seed=2)
    eff = layer.effective_ssm("recurrent")
    cfg = CrossbarConfig(tile_rows=16, tile_cols=14, state_update=update)  # 2 channels per array: 7 x 7 (7 x 8)
    layout = IMSSALayout.of(eff.C, eff.D, cfg, delayed)
    assert layout.n_arrays == 3 and layout.input_lines == layout.lines + 5 * delayed
    assert layout.increment == (update == "increment")
    cells = Cells.of(eff, layout)
    arr, row, col = cells.positions(layout)
    values = cells.flat()
    n_in = 7 + delayed
    for a in range(layout.n_arrays):
        c0, c1 = layout.arr_ptr[a], layout.arr_ptr[a + 1]
        dense = np.zeros((7 * (c1 - c0), n_in * (c1 - c0)))
        dense[row[arr == a], col[arr == a]] = values[arr == a]
        blocks = [channel_matrix(eff.Abar[h], eff.Bbar[h], eff.C[h], eff.D[h], delayed)
                  for h in layout.channel[c0:c1]]
        if update == "increment":  # the state rows hold Abar - I: the identity comes off their diagonal
            for blk in blocks:
                blk[np.arange(6), np.arange(6)] -= 1.0
        assert np.array_equal(dense, block_diag(*blocks))  # the channels' blocks on the diagonal, nothing else


def test_pack_channels():
    assert pack_channels([9, 9, 9, 9], 20, 20) == [(0, 2), (2, 4)]
    assert pack_channels([9, 0, 9, 9], 20, 30) == [(0, 1), (2, 4)]  # a skipped channel ends a range
    assert pack_channels([25, 3, 3], 20, 20) == [(0, 1), (1, 3)]     # too big for a tile: alone
    assert pack_channels([0, 0], 8, 8) == []
    # an extra input per channel: 2 x (9 + 1) inputs fit 20 rows, a third does not
    assert pack_channels([9, 9, 9], 20, 30, extra_inputs=1) == [(0, 2), (2, 3)]
    assert pack_channels([9, 9, 9], 29, 30, extra_inputs=1) == [(0, 2), (2, 3)]
    assert pack_channels([9, 9, 9], 30, 30, extra_inputs=1) == [(0, 3)]


# -- ideal arrays are the digital model ------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_ideal_analog_equals_the_digital_recurrence(arch):
    model = S4DModel(2, 3, dtype=np.float64, seed=1, **{**TINY, **arch})
    x = _x()
    digital = model.forward(x, mode="recurrent")
    # small tiles: channels packed 2 per array
    analog = to_analog(model, CrossbarConfig.ideal(dtype="float64", tile_rows=20, tile_cols=11))
    # float64 rounding of sums of a few O(1) products over 10 steps and 2 layers: 1e-12 relative to the
    # logit scale is ~5000 eps of slack and 10 orders below any mapping error
    np.testing.assert_allclose(analog.forward(x), digital, rtol=0, atol=1e-12 * np.abs(digital).max())


@pytest.mark.parametrize("preset", ["qs4d", "s4d-example"])
@pytest.mark.parametrize("quant", [None, QAT])
@pytest.mark.parametrize("readout", ["direct", "delayed"])
@pytest.mark.parametrize("update", ["full", "increment"])
def test_ideal_analog_equals_digital_for_the_presets(preset, quant, readout, update):
    model = S4DModel.from_preset(preset, 2, 3, d_model=8, d_state=8, n_layers=2, dtype=np.float64, seed=3,
                                 quant=quant)
    x = _x(batch=4, length=12)
    model.forward(x, training=True)  # BatchNorm running statistics away from their initial values
    digital = model.forward(x, mode="recurrent")
    analog = to_analog(model, CrossbarConfig.ideal(dtype="float64", ssm_readout=readout, state_update=update))
    assert all(core.layout.delayed == (readout == "delayed") for core in _cores(analog))
    assert all(core.layout.increment == (update == "increment") for core in _cores(analog))
    np.testing.assert_allclose(analog.forward(x), digital, rtol=0, atol=1e-12 * np.abs(digital).max())
    if quant is not None:  # the arrays hold the quantized values: the float weights would differ
        float_model = S4DModel.from_preset(preset, 2, 3, d_model=8, d_state=8, n_layers=2, dtype=np.float64,
                                           seed=3)
        float_model.forward(x, training=True)
        assert np.abs(float_model.forward(x, mode="recurrent") - digital).max() > 1e-3


def test_conversion_is_a_substitution_and_leaves_the_model_alone():
    model = S4DModel(2, 3, dtype=np.float64, seed=1, **TINY)
    before = {k: v.copy() for k, v in model.params.items()}
    analog = to_analog(model, CrossbarConfig())
    assert isinstance(analog.encoder, AnalogLinear) and isinstance(analog.decoder, AnalogLinear)
    for block in analog.blocks:
        assert isinstance(block.ssm.core, AnalogSSMCore)
        assert isinstance(block.ssm.mixing.linear, AnalogLinear)
    assert list(analog.params) == list(model.params)  # the same names: the digital parameters
    assert all(np.array_equal(model.params[k], v) for k, v in before.items())
    assert not isinstance(model.encoder, AnalogLinear) and not isinstance(model.blocks[0].ssm.core, AnalogSSMCore)
    with pytest.raises(ValueError, match="inference only"):
        analog.forward(_x(), training=True)


@pytest.mark.parametrize("readout", ["direct", "delayed"])
def test_streaming_runs_on_the_arrays(readout):
    model = S4DModel(2, 3, dtype=np.float64, seed=1, **TINY)
    x = _x(length=6)
    analog = to_analog(model, CrossbarConfig.ideal(dtype="float64", ssm_readout=readout))
    stream = analog.stream()
    assert not stream.fused  # the fused kernel does not know analog parts
    logits, _ = stream.run(x)
    np.testing.assert_allclose(logits[:, -1], analog.forward(x), rtol=0, atol=1e-12)
    # with converters: the stream steps the same arrays (same codes, no noise); a delayed stream step reads
    # the state, then the output without the next input, which moves an absmax-managed or rerun vector's
    # codes: the same codes need a fixed grid
    fixed = dict(noise_management="none", bound_management=False) if readout == "delayed" else {}
    noisy = to_analog(model, CrossbarConfig(ssm_readout=readout, **fixed), calib=x)
    last, _ = noisy.stream().run(x)
    np.testing.assert_array_equal(last[:, -1], noisy.forward(x))


# -- the kernel and its twin --------------------------------------------------------------
def _layer_case(seed, H, N, cfg, pruned=0.0, delayed=False):
    rng = np.random.default_rng(seed)
    layer = S4D(H, N, dtype=np.float64, seed=seed)
    C = layer.params["C"]
    C[rng.random(C.shape) < pruned] = 0
    eff = layer.effective_ssm("recurrent")
    layout = IMSSALayout.of(eff.C, eff.D, cfg, delayed)
    return layout, Cells.of(eff, layout), rng


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 31), H=st.integers(1, 4), N=st.sampled_from([2, 4, 6]),
       dac=st.integers(3, 8), adc=st.integers(3, 10), levels=st.integers(3, 200),
       out_bound=st.sampled_from([0.3, 1.0, 12.0]), nm=st.sampled_from(["absmax", "none"]),
       bm=st.booleans(), scaling=st.sampled_from(["tensor", "output"]), pruned=st.sampled_from([0.0, 0.4]),
       calibrated=st.booleans(), delayed=st.booleans(), update=st.sampled_from(["full", "increment"]))
def test_kernel_equals_twin_on_noise_free_integer_configs(seed, H, N, dac, adc, levels, out_bound, nm, bm, scaling,
                                                          pruned, calibrated, delayed, update):
    cfg = CrossbarConfig(dac_bits=dac, adc_bits=adc, out_bound=out_bound, g_levels=levels, noise_management=nm,
                         bound_management=bm, bm_max_rounds=3, weight_scaling=scaling, tile_rows=12, tile_cols=12,
                         state_update=update)
    layout, cells, rng = _layer_case(seed, H, N, cfg, pruned, delayed)
    ranges = None
    if calibrated:
        from qs4d_np.hardware.imssa import Ranges
        E, n_ch = layout.n_modes, layout.channel.shape[0]
        ranges = Ranges(rng.uniform(0.2, 3, (E, 2)), rng.uniform(0.2, 3, n_ch), rng.uniform(0.1, 2, (E, 2)),
                        rng.uniform(0.1, 2, n_ch), 1.0)
    prog = program_layer(cells, layout, cfg, ranges, rng)
    u = rng.standard_normal((2, 7, H)) * 2
    x0 = rng.standard_normal((2, 2, layout.n_modes))
    args = prog.scan_args(layout, u, x0, 0, 4.0)
    fast, slow = imssa_scan(*args), ref.imssa_scan(*args)
    for name, a, b in zip(("y", "state", "clipped", "retries", "overflow"), fast, slow):
        assert np.array_equal(a, b), name


def test_kernel_and_twin_agree_in_distribution_with_noise():
    # read noise of both kinds, small enough that no mode is driven far from its noise-free path
    cfg = CrossbarConfig(out_noise=0.02, w_noise=0.01, tile_rows=14, tile_cols=14)
    layout, cells, rng = _layer_case(5, 3, 6, cfg)
    prog = program_layer(cells, layout, cfg, None, rng)
    u = rng.standard_normal((2, 20, 3))
    x0 = np.zeros((2, 2, layout.n_modes))
    draws = 128
    fast = np.stack([imssa_scan(*prog.scan_args(layout, u, x0, key, np.inf))[0] for key in range(draws)])
    slow = np.stack([ref.imssa_scan(*prog.scan_args(layout, u, x0, key, np.inf))[0]
                     for key in range(draws, 2 * draws)])
    # different noise draws of the same arrays: the mean |output| and the spread around the noise-free
    # outputs agree within 5% (kernel against kernel on other keys: within 2% at 64 draws)
    clean = imssa_scan(*program_layer(cells, layout, dataclasses.replace(cfg, out_noise=0.0, w_noise=0.0), None,
                                      np.random.default_rng(5)).scan_args(layout, u, x0, 0, np.inf))[0]
    for stat in (lambda z: np.abs(z).mean(), lambda z: np.sqrt(((z - clean) ** 2).mean())):
        assert abs(stat(fast) / stat(slow) - 1) < 0.05
    assert np.sqrt(((fast - clean) ** 2).mean()) > 0.1 * np.abs(clean).mean()  # the noise is not negligible
    # the same key: the same normals, the same outputs up to the summation order
    same = ref.imssa_scan(*prog.scan_args(layout, u, x0, 3, np.inf))[0]
    np.testing.assert_allclose(fast[3], same, rtol=0, atol=1e-9 * np.abs(same).max())
    assert np.abs(fast[3] - fast[4]).max() > 0.1 * np.abs(same).max()  # while another key differs


@pytest.mark.parametrize("kind", ["prog", "read"])
def test_increment_update_shrinks_the_noise_of_slow_modes(kind):
    # dt near dt_min: |Abar - I| ~ dt |A| ~ 1e-2; a cell error relative to its row's largest weight moves
    # Abar by ~1e-2 of the noise level with the increment rows, by ~1 of it with the full rows
    rng = np.random.default_rng(7)
    layer = S4D(4, 8, dtype=np.float64, seed=7, dt_min=1e-3, dt_max=5e-3)
    eff = layer.effective_ssm("recurrent")
    u = rng.standard_normal((2, 200, 4))
    noise = (dict(prog_noise=0.002, prog_noise_type="gaussian") if kind == "prog" else dict(out_noise=0.002))
    err = {}
    for update in ("full", "increment"):
        cfg = CrossbarConfig.ideal(weight_scaling="output", state_update=update, tile_rows=20, tile_cols=20)
        layout = IMSSALayout.of(eff.C, eff.D, cfg)
        cells = Cells.of(eff, layout)
        x0 = np.zeros((2, 2, layout.n_modes))
        exact = imssa_scan(*program_layer(cells, layout, cfg, None, None).scan_args(layout, u, x0, 0, np.inf))[0]
        noisy = program_layer(cells, layout, dataclasses.replace(cfg, **noise), None, np.random.default_rng(1))
        y = imssa_scan(*noisy.scan_args(layout, u, x0, 0, np.inf))[0]
        err[update] = np.sqrt(((y - exact) ** 2).mean()) / np.sqrt((exact ** 2).mean())
    assert err["full"] > 0.03  # the noise matters at all (full rows: 0.12 / 0.16 measured)
    assert err["increment"] < 0.2 * err["full"]  # measured: 9x (prog) / 15x (read) smaller


# -- calibration ------------------------------------------------------------------------
def _slow_model(seed=4):
    # dt near dt_min: |Abar| ~ 1 and Bbar ~ dt small next to it, the hard case for shared converters
    model = S4DModel.from_preset("qs4d", 1, 3, d_model=6, d_state=8, n_layers=2, dtype=np.float64, seed=seed,
                                 dt_min=1e-3, dt_max=5e-3)
    x = np.random.default_rng(seed).standard_normal((8, 60, 1))
    model.forward(x, training=True)
    return model, x


def test_calibration_makes_noise_free_converters_follow_the_digital_model():
    model, x = _slow_model()
    digital = model.forward(x, mode="recurrent")
    cfg = CrossbarConfig(dac_bits=8, adc_bits=10)
    err = {calib: np.abs(to_analog(model, cfg, calib=(x if calib else None)).forward(x) - digital).max()
           for calib in (False, True)}
    scale = np.abs(digital).max()
    # shared absmax DAC vector and +-12 ADC: the small Bbar*u terms drown; calibrated lines keep them
    assert err[True] < 0.05 * scale < err[False]


def test_calibration_is_deterministic_and_sets_ranges_per_line():
    model, x = _slow_model()
    cfg = CrossbarConfig(dac_bits=8, adc_bits=10, prog_noise=1.0)
    a, b = (to_analog(model, cfg, seed=3, calib=x) for _ in range(2))
    for pa, pb in zip(_cores(a), _cores(b)):
        for field in ("r_s", "r_u", "R_s", "R_y"):
            assert np.array_equal(getattr(pa.ranges, field), getattr(pb.ranges, field))
        assert pa.ranges.r_s.std() > 0  # one range per line ("column" granularity)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    pooled = to_analog(model, dataclasses.replace(cfg, calib_granularity="array"), seed=3, calib=x)
    core = _cores(pooled)[0]
    assert np.unique(core.ranges.r_s).size <= core.layout.n_arrays
    # a batch list calibrates as the same sequences in one array do
    listed = to_analog(model, cfg, seed=3, calib=[x[:5], x[5:]])
    assert np.array_equal(_cores(listed)[1].ranges.R_y, _cores(a)[1].ranges.R_y)


def test_percentile_rule_gives_smaller_ranges_than_max():
    model, x = _slow_model()
    cfg = CrossbarConfig(dac_bits=8, adc_bits=10)
    full = _cores(to_analog(model, cfg, calib=x))[0].ranges
    robust = _cores(to_analog(model, dataclasses.replace(cfg, calib_rule="percentile", calib_percentile=50.0),
                              calib=x))[0].ranges
    assert np.all(robust.r_u <= full.r_u) and np.any(robust.r_u < full.r_u)


# -- outcomes, counts, noise, drift --------------------------------------------------
def test_overflow_is_a_reported_outcome():
    model = S4DModel(2, 3, seed=6, **TINY)
    core = model.blocks[1].ssm.core
    eff = core.effective()
    # growing modes, as programming noise can make of modes with |Abar| near 1
    core.effective = lambda mode="recurrent": dataclasses.replace(eff, Abar=1.5 * eff.Abar / np.abs(eff.Abar))
    x = _x(batch=4, length=300).astype(np.float32)
    labels = np.zeros(4, dtype=np.int64)
    out = evaluate_analog(model, x, labels, CrossbarConfig.ideal())
    assert out["overflowed"] == 4 and out["accuracy"] == 0.0 and out["agreement"] == 0.0
    assert out["state_bounds"] == [None, None]
    bounded = evaluate_analog(model, x, labels, CrossbarConfig.ideal(), state_bound=10.0)
    assert bounded["overflowed"] == 4 and bounded["state_bounds"] == [10.0, 10.0]
    analog = to_analog(model, CrossbarConfig.ideal(), state_bound=10.0)
    assert np.all(np.isfinite(analog.forward(x)))
    assert np.all(_cores(analog)[1].last_overflow > 0) and np.all(_cores(analog)[0].last_overflow < 0)


@pytest.mark.parametrize("tiles", [(256, 256), (20, 11), (10, 9)])
@pytest.mark.parametrize("readout", ["direct", "delayed"])
def test_counts_equal_the_mapping_formula(tiles, readout):
    model = S4DModel(2, 3, seed=2, **TINY)
    cfg = CrossbarConfig(tile_rows=tiles[0], tile_cols=tiles[1], ssm_readout=readout)
    x = _x(batch=5, length=7).astype(np.float32)
    analog = to_analog(model, cfg)
    analog.forward(x[:2])
    analog.forward(x[2:])
    out = evaluate_analog(model, x, np.zeros(5, dtype=np.int64), cfg, batch_size=2)
    counts = mapping_counts(model, cfg, length=7)
    assert out["arrays"] == counts["arrays"]
    assert out["adc_conversions"] == 5 * counts["adc_conversions_per_sample"]
    assert sum(core.counters.mvms for core in _cores(analog)) == 5 * counts["ssm_array_reads_per_sample"]
    assert counts["ssm_input_lines"] == sum(core.layout.input_lines for core in _cores(analog))
    H, n, L, layers = 6, 9, 7, 2
    delayed = readout == "delayed"
    assert counts["ssm_input_lines"] == layers * H * (n + delayed)  # one more line per channel delayed
    if tiles == (256, 256):  # by hand: encoder, decoder, 2 x (one SSM array for 6 blocks of 9, mixing)
        assert counts["arrays"] == 2 + 2 * 2
        assert counts["adc_conversions_per_sample"] == L * (H + layers * (H * n + 2 * H)) + 3
        assert counts["ssm_array_reads_per_sample"] == layers * (L + delayed)  # the last delayed read
    if tiles == (10, 9):  # a 9 x 9 direct block fits a 10-input tile, a 10 x 9 delayed block exactly
        assert counts["ssm_array_reads_per_sample"] == layers * H * (L + delayed)


def test_a_channel_larger_than_a_tile_is_refused():
    model = S4DModel(2, 3, seed=2, **TINY)
    with pytest.raises(ValueError, match="needs 9 inputs x 9 outputs, more than a 8 x 8 tile"):
        to_analog(model, CrossbarConfig(tile_rows=8, tile_cols=8))
    with pytest.raises(ValueError, match="needs 10 inputs x 9 outputs, more than a 9 x 9 tile"):
        to_analog(model, CrossbarConfig(tile_rows=9, tile_cols=9, ssm_readout="delayed"))


def test_pruned_modes_drop_out_and_outputs_stay_exact():
    model = S4DModel(2, 3, dtype=np.float64, seed=3, **TINY)
    ssm = model.blocks[0].ssm
    ssm.params["C"][0, :] = 0       # channel 0: no mode left ...
    ssm.params["D"][0] = 0          # ... and no skip: the channel is not mapped
    ssm.params["C"][1, 1:3] = 0     # channel 1: two of four modes pruned
    cfg = CrossbarConfig.ideal(dtype="float64")
    x = _x()
    digital = model.forward(x, mode="recurrent")
    np.testing.assert_allclose(to_analog(model, cfg).forward(x), digital, rtol=0, atol=1e-12)
    full = mapping_counts(S4DModel(2, 3, dtype=np.float64, seed=3, **TINY), cfg, length=10)
    pruned = mapping_counts(model, cfg, length=10)
    # channel 0 loses its 9 conversions per step, channel 1 two modes (4 reals)
    assert full["adc_conversions_per_sample"] - pruned["adc_conversions_per_sample"] == 10 * (9 + 4)


def test_seeded_reproducibility_and_fresh_read_noise():
    model = S4DModel(2, 3, seed=4, **TINY)
    x = _x().astype(np.float32)
    cfg = CrossbarConfig.realistic()
    a = to_analog(model, cfg, seed=7, calib=x).forward(x)
    assert np.array_equal(a, to_analog(model, cfg, seed=7, calib=x).forward(x))
    assert not np.array_equal(a, to_analog(model, cfg, seed=8, calib=x).forward(x))
    analog = to_analog(model, cfg, seed=7)
    assert not np.array_equal(analog.forward(x), analog.forward(x))  # read noise redrawn per forward
    noise_free = to_analog(model, CrossbarConfig(), seed=7)
    assert np.array_equal(noise_free.forward(x), noise_free.forward(x))


def test_drift_is_off_by_default_and_compensated():
    from qs4d_np.hardware.crossbar import CrossbarArray

    rng = np.random.default_rng(0)
    W, x = rng.standard_normal((64, 48)), rng.standard_normal((32, 48))
    base = CrossbarConfig.ideal(dtype="float64", prog_noise=1.0, prog_noise_type="pcm")
    fresh = CrossbarArray(W, base, 2).mvm(x)
    assert np.array_equal(fresh, CrossbarArray(W, dataclasses.replace(base, t_inference=0.0), 2).mvm(x))
    day = 86400.0
    raw = CrossbarArray(W, dataclasses.replace(base, t_inference=day, drift_compensation=False), 2).mvm(x)
    comp = CrossbarArray(W, dataclasses.replace(base, t_inference=day), 2).mvm(x)
    # a day of drift (nu ~ 0.05-0.1 per device) shrinks the outputs by about (86420/20)^-0.07 ~ 0.55 ...
    assert 0.4 < np.abs(raw).mean() / np.abs(fresh).mean() < 0.8
    # ... the global compensation restores their scale; what stays is the spread of nu between devices
    assert abs(np.abs(comp).mean() / np.abs(fresh).mean() - 1) < 0.05
    assert np.abs(comp - fresh).mean() < 0.5 * np.abs(raw - fresh).mean()
    # the model's arrays drift too: its outputs change, and not at t_inference = 0
    model = S4DModel(2, 3, dtype=np.float64, seed=1, **TINY)
    xs = _x()
    now = to_analog(model, base, seed=2).forward(xs)
    later = to_analog(model, dataclasses.replace(base, t_inference=day), seed=2).forward(xs)
    assert np.abs(later - now).max() > 1e-3


def test_bits_from_model_take_the_state_width():
    model = S4DModel(2, 3, seed=1, quant=QuantConfig(state=64), **TINY)
    analog = to_analog(model, CrossbarConfig(bits_from_model=True))
    assert all(core.config.dac_bits == 6 and core.config.adc_bits == 6 for core in _cores(analog))
    assert analog.encoder.config.dac_bits == 7  # the Linear arrays keep the config's


def test_bad_input_is_named():
    model = S4DModel(2, 3, seed=0, **TINY)
    x = _x().astype(np.float32)
    y = np.zeros(3, dtype=np.int64)
    cfg = CrossbarConfig()
    with pytest.raises(TypeError, match="config must be a CrossbarConfig"):
        to_analog(model, {"out_noise": 0.1})
    with pytest.raises(TypeError, match="model must be an S4DModel"):
        to_analog(object(), cfg)
    with pytest.raises(ValueError, match=r"calib must have shape \(batch, length, 2\)"):
        to_analog(model, cfg, calib=x[..., :1])
    with pytest.raises(ValueError, match=r"calib\[1\] must have shape \(batch, length, 2\)"):
        to_analog(model, cfg, calib=[x, x[..., :1]])
    with pytest.raises(TypeError, match="calib must be an array"):
        to_analog(model, cfg, calib="batches")
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
        to_analog(model, cfg, state_bound=0.0)
    with pytest.raises(ValueError, match="length must be >= 1"):
        mapping_counts(model, cfg, 0)
    with pytest.raises(ValueError, match=r"unknown CrossbarConfig key\(s\) \['calib_rules'\]"):
        CrossbarConfig.from_dict({"calib_rules": "max"})
    with pytest.raises(ValueError, match="CrossbarConfig.ssm_readout"):
        CrossbarConfig(ssm_readout="late")
    for key, value in (("calib_margin", 0.0), ("calib_percentile", 0.0), ("t_inference", -1.0)):
        with pytest.raises(ValueError, match=f"CrossbarConfig.{key}"):
            CrossbarConfig(**{key: value})
    from qs4d_np.hardware.crossbar import CrossbarArray
    with pytest.raises(ValueError, match="in_range must hold ranges > 0"):
        CrossbarArray(np.ones((2, 3)), cfg, in_range=np.array([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="out_range must hold ranges > 0"):
        CrossbarArray(np.ones((2, 3)), cfg, out_range=np.array([-1.0, 1.0]))


def _grid_case():
    """A layer-0 QAT case with a static 6-bit state grid, its calibration data and a 6-bit DAC config."""
    from qs4d_np.train.ptq import calibrate

    quant = QuantConfig(state=64, target_options={"state": {"scale_mode": "running"}})
    model = S4DModel(1, 3, dtype=np.float64, seed=3, quant=quant, **TINY)
    x = np.random.default_rng(1).standard_normal((6, 40, 1))
    calibrate(model, [x], mode="recurrent")
    # the ADC ranges get a margin: at the calibration maximum, the inputs rounded onto the DAC grid below
    # would clip a few state outputs
    cfg = CrossbarConfig(dac_bits=6, adc_bits=20, noise_management="none", bound_management=False,
                         dtype="float64", calib_margin=1.5)
    return model, x, cfg


def _on_input_grid(model, core, x):
    """Layer 0's input (postnorm: the encoder's output) put on the input lines' 6-bit DAC grid, so that
    the input line adds no rounding of its own."""
    u = model.encoder.forward(x)
    step_u = np.zeros(6)
    step_u[core.layout.channel] = core.ranges.r_u / 31
    return np.clip(np.rint(u / step_u), -31, 31) * step_u


def test_model_state_grid_codes_the_state_as_the_digital_recurrence():
    model, x, cfg = _grid_case()
    parts = model.blocks[0].ssm.core.state_quantizer.frozen_parts(6, np.dtype(np.float64))
    inv = np.stack([p.inv for p in parts])  # (2, H) codes per unit
    same = {}
    for grid in ("calibrated", "model"):
        core = _cores(to_analog(model, dataclasses.replace(cfg, state_grid=grid), calib=x))[0]
        u = _on_input_grid(model, core, x)
        stepper = model.blocks[0].ssm.stepper()
        state = stepper.initial_state(x.shape[0])
        for t in range(x.shape[1]):
            _, state = stepper.step(u[:, t], state)
        _, xa = core.run(u, np.zeros((x.shape[0], 2, core.layout.n_modes)))
        ch = core.layout.channel[core.layout.mode_channel()]
        want = state[core.layout.mode, :, ch].T
        # the register holds the 20-bit ADC's value; the DAC codes it for the next step
        codes = np.clip(np.rint(xa * inv[:, ch]), -31, 31)
        same[grid] = np.mean(codes == np.stack([np.rint(want.real * inv[0, ch]), np.rint(want.imag * inv[1, ch])],
                                               axis=1))
    # the 6-bit DAC codes the state on the digital quantizer's grid: the same codes but where a 20-bit ADC
    # rounding or a float rounding moved a value across a rounding edge (rare); a calibrated range is
    # another grid
    assert same["model"] > 0.99 and same["calibrated"] < 0.9
    with pytest.raises(ValueError, match="needs noise_management='none'"):
        CrossbarConfig(state_grid="model")
    with pytest.raises(ValueError, match="pass calib"):
        to_analog(model, dataclasses.replace(cfg, state_grid="model"))
    absmax = S4DModel(1, 3, seed=3, quant=QuantConfig(state=64), **TINY)
    with pytest.raises(ValueError, match="needs a static state range"):
        to_analog(absmax, dataclasses.replace(cfg, state_grid="model"), calib=x)


def test_delayed_readout_reads_the_model_grid_state():
    model, x, cfg = _grid_case()
    cfg = dataclasses.replace(cfg, state_grid="model")
    err = {}
    for readout in ("direct", "delayed", "auto"):
        core = _cores(to_analog(model, dataclasses.replace(cfg, ssm_readout=readout), calib=x))[0]
        assert core.layout.delayed == (readout != "direct")  # "auto": the state is quantized
        u = _on_input_grid(model, core, x)
        want = model.blocks[0].ssm.core.forward(u, mode="recurrent")  # 2Re(C q(x_t)) + D u_t
        y, _ = core.run(u, np.zeros((x.shape[0], 2, core.layout.n_modes)))
        half_step = 0.5 * core.programmed.step_y * core.programmed.f_y  # the output ADC's rounding, model units
        err[readout] = np.abs(y - want)[..., core.layout.channel] / half_step
    # delayed: the output row reads the state codes themselves, so y is the model's read-out up to the output
    # ADC's rounding (float rounding of the scales: 1e-9 of a half step); direct reads C on the unquantized
    # new state, whose distance to the grid (up to half a state step, |C| ~ 0.5) is 10^3-10^4 output steps
    assert err["delayed"].max() <= 1 + 1e-9 and np.array_equal(err["auto"], err["delayed"])
    assert np.median(err["direct"]) > 100
