"""The crossbar MVM pipeline: exactness when ideal, statistics of the noise, tiling,
bound management, reproducibility, bad input, and the kernels against reference/."""
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware import crossbar
from qs4d_np.hardware.crossbar import CrossbarArray, program
from reference import crossbar as ref


def _data(out_f=12, in_f=20, batch=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((out_f, in_f)), rng.standard_normal((batch, in_f)) * 2.0


@pytest.mark.parametrize("dtype,rel", [("float64", 1e-13), ("float32", 1e-5)])
def test_ideal_crossbar_is_the_float_matmul(dtype, rel):
    W, x = _data(20, 40, 8)
    y = program(W, CrossbarConfig.ideal(dtype=dtype, tile_rows=16, tile_cols=7)).mvm(x)
    # rounding bound: a few eps of the dtype times n_in, relative to sum_j |x_j||w_ij|
    assert np.all(np.abs(y - x @ W.T) <= rel * (np.abs(x) @ np.abs(W).T))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("nm", ["absmax", "none"])
@pytest.mark.parametrize("out_bound", [12.0, 1.5])
def test_noise_free_dac_adc_equals_integer_computation(dtype, nm, out_bound):
    W, x = _data(16, 48, 10, seed=1)
    x = x if nm == "absmax" else np.clip(x / 4, -1, 1)
    cfg = CrossbarConfig(g_levels=128, adc_bits=8, out_bound=out_bound, noise_management=nm,
                         bound_management=False, dtype=dtype)
    arr = program(W, cfg)
    adc, y_int, clipped = ref.integer_mvm(W, x, cfg)
    # every partial sum is an integer below 48 * 63 * 127 < 2^24: exact in float32 too
    assert np.array_equal(arr.mvm(x), y_int.astype(dtype))
    assert arr.stats.clipped_outputs == clipped
    assert (clipped > 0) == (out_bound < 12.0)


@settings(max_examples=30, deadline=None)
@given(out_f=st.integers(1, 12), in_f=st.integers(1, 40), batch=st.integers(1, 5),
       dac_bits=st.integers(2, 8), adc_bits=st.integers(2, 12), levels=st.integers(2, 256),
       out_bound=st.sampled_from([0.25, 1.0, 4.0, 12.0]), nm=st.sampled_from(["absmax", "none"]),
       dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2 ** 32 - 1))
def test_integer_computation_property(out_f, in_f, batch, dac_bits, adc_bits, levels, out_bound, nm, dtype,
                                      seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out_f, in_f))
    x = rng.uniform(-1.2, 1.2, (batch, in_f))
    cfg = CrossbarConfig(dac_bits=dac_bits, adc_bits=adc_bits, out_bound=out_bound, g_levels=levels,
                         noise_management=nm, bound_management=False, dtype=dtype)
    arr = program(W, cfg)
    _, y_int, clipped = ref.integer_mvm(W, x, cfg)
    # partial sums <= 40 * 127 * 255 < 2^24: exact in float32
    assert np.array_equal(arr.mvm(x), y_int.astype(dtype))
    assert arr.stats.clipped_outputs == clipped


def _noise_samples(cfg, W, x, reps):
    arr = program(W, cfg, seed=3)
    clean = x @ W.T
    return np.stack([arr.mvm(x) - clean for _ in range(reps)])


def test_out_noise_std_within_5_percent():
    W, x = _data(25, 30, 40)
    W /= np.abs(W).max()  # w_absmax = 1: normalized outputs are outputs
    noise = _noise_samples(CrossbarConfig.ideal(out_noise=0.1, dtype="float64"), W, x, 40)
    # 40000 samples: the std estimate has a relative standard error of 0.35%
    assert abs(noise.std() / 0.1 - 1) < 0.05
    assert abs(noise.mean()) < 0.1 * 5 / np.sqrt(noise.size)


@pytest.mark.parametrize("kind", ["additive", "proportional"])
def test_weight_noise_std_within_5_percent(kind):
    W, x = _data(25, 30, 40, seed=2)
    W /= np.abs(W).max()
    cfg = CrossbarConfig.ideal(w_noise=0.03, w_noise_type=kind, dtype="float64")
    noise = _noise_samples(cfg, W, x, 40)
    if kind == "additive":
        std = 0.03 * np.linalg.norm(x, axis=1)[:, None]
    else:
        std = 0.03 * np.sqrt((x ** 2) @ np.abs(W).T)
    assert abs((noise / std).std() - 1) < 0.05


def test_programming_noise_fixed_and_read_noise_fresh():
    W, x = _data(10, 16, 5)
    cfg = CrossbarConfig.ideal(prog_noise=1.0, out_noise=0.05, dtype="float64")
    arr = program(W, cfg, seed=7)
    w_before = arr.weights.copy()
    ys = np.stack([arr.mvm(x) for _ in range(300)])
    assert np.array_equal(arr.weights, w_before)
    assert not np.array_equal(ys[0], ys[1])  # read noise redrawn at every MVM
    # the mean converges to the programmed (not the target) weights
    err_prog = np.abs(ys.mean(0) - x @ w_before.T).max()
    standard_error = 0.05 * np.abs(W).max() / np.sqrt(300)  # out_noise is relative to w_absmax
    assert err_prog < 5 * standard_error
    assert np.abs(x @ w_before.T - x @ W.T).max() > 5 * err_prog
    # read noise off: every MVM of the noisy-programmed array is identical
    quiet = program(W, CrossbarConfig.ideal(prog_noise=1.0, dtype="float64"), seed=7)
    assert np.array_equal(quiet.weights, w_before)
    assert np.array_equal(quiet.mvm(x), quiet.mvm(x))


@pytest.mark.parametrize("kind", ["pcm", "gaussian"])
def test_programming_noise_std(kind):
    rng = np.random.default_rng(4)
    W = rng.uniform(0.3, 1.0, (200, 200))
    W[0, 0] = 1.0
    cfg = CrossbarConfig.ideal(prog_noise=1.0 if kind == "pcm" else 0.02, prog_noise_type=kind)
    arr = program(W, cfg, seed=5)
    g = W / W.max()
    c0, c1, c2 = cfg.pcm_coeffs
    sigma = (c0 + c1 * g + c2 * g * g) / 25 if kind == "pcm" else 0.02
    # targets >= 0.3 g_max sit > 10 sigma above the clamp at 0
    z = (arr.conductances.g_pos - g) / sigma
    assert abs(z.std() - 1) < 0.05 and abs(z.mean()) < 0.05


def test_noise_exactly_off_at_zero_and_same_seed_same_numbers():
    W, x = _data()
    cfg = CrossbarConfig.realistic(w_noise=0.02)
    a, b = program(W, cfg, seed=11), program(W, cfg, seed=11)
    assert np.array_equal(a.mvm(x), b.mvm(x)) and np.array_equal(a.mvm(x), b.mvm(x))
    assert not np.array_equal(program(W, cfg, seed=12).mvm(x), program(W, cfg, seed=11).mvm(x))
    off = CrossbarConfig.realistic(out_noise=0.0, prog_noise=0.0)
    assert np.array_equal(program(W, off, seed=1).mvm(x), program(W, CrossbarConfig(), seed=2).mvm(x))


def test_results_do_not_depend_on_thread_count(monkeypatch):
    W, x = _data(30, 50, 64)
    cfg = CrossbarConfig.realistic(w_noise=0.02, out_bound=0.5, tile_rows=20, tile_cols=16)
    threads = numba.get_num_threads()
    results = []
    try:
        for min_work, n_threads in [(1 << 62, 1), (0, 1), (0, numba.config.NUMBA_NUM_THREADS)]:
            # min_work 0 forces the parallel kernels even for this small batch
            monkeypatch.setattr(crossbar, "PARALLEL_MIN_WORK", min_work)
            numba.set_num_threads(n_threads)
            arr = program(W, cfg, seed=9)
            results.append(arr.mvm(x))
            assert arr.stats.bm_retries > 0  # bound management's subsets are covered too
    finally:
        numba.set_num_threads(threads)
    assert all(np.array_equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("dtype,eps", [("float32", 2.0 ** -23), ("float64", 2.0 ** -52)])
def test_tiling_equals_one_array_when_noise_is_off(dtype, eps):
    W, x = _data(23, 37, 9, seed=5)
    # DAC + levels, ideal ADC: the tiles' integer partial sums are exact, only the
    # digital rescale-and-add of the 5 row tiles rounds (a few eps of the sum of |parts|)
    cfg = CrossbarConfig(g_levels=64, adc_bits=None, out_bound=None, bound_management=False, dtype=dtype)
    one = program(W, cfg).mvm(x)
    tiled = program(W, CrossbarConfig.from_dict({**cfg.to_dict(), "tile_rows": 8, "tile_cols": 5})).mvm(x)
    bound = 8 * eps * (np.abs(x) @ np.abs(W).T + np.abs(one))
    assert np.all(np.abs(one - tiled) <= bound)
    ideal = CrossbarConfig.ideal(dtype="float64")
    small = CrossbarConfig.ideal(dtype="float64", tile_rows=8, tile_cols=5)
    assert np.allclose(program(W, ideal).mvm(x), program(W, small).mvm(x), rtol=0, atol=1e-12)


def test_tiling_with_adc_differs_by_at_most_the_adc_rounding():
    W, x = _data(23, 37, 9, seed=5)
    cfg = CrossbarConfig(g_levels=64, bound_management=False, dtype="float64")
    one = program(W, cfg).mvm(x)
    tiled = program(W, CrossbarConfig(g_levels=64, bound_management=False, dtype="float64",
                                      tile_rows=8)).mvm(x)
    scale = cfg.out_step * np.abs(W).max() * np.abs(x).max(axis=1, keepdims=True)
    # 5 row tiles each round half a step, the single array once
    assert np.all(np.abs(one - tiled) <= (5 + 1) * 0.5 * scale * (1 + 1e-12))


def test_bound_management_removes_clipping():
    W, x = _data(16, 64, 20, seed=6)
    W = np.abs(W)  # same-sign sums: large outputs that clip a small ADC range
    base = dict(out_bound=2.0, dtype="float64")
    no_bm = program(W, CrossbarConfig(bound_management=False, **base))
    y_no = no_bm.mvm(x)
    assert no_bm.stats.clipped_outputs > 0 and no_bm.stats.bm_retries == 0
    bm = program(W, CrossbarConfig(bound_management=True, bm_max_rounds=10, **base))
    y_bm = bm.mvm(x)
    assert bm.stats.clipped_outputs == 0 and bm.stats.bm_retries > 0
    exact = x @ W.T
    assert np.abs(y_bm - exact).max() < 0.1 * np.abs(y_no - exact).max()


def test_tile_limit_without_tiling_is_refused():
    W = np.ones((300, 10))
    with pytest.raises(ValueError, match="tile_cols"):
        program(W, CrossbarConfig(tiling=False))
    assert len(program(W, CrossbarConfig()).tiles) == 2


def test_bad_input_is_named():
    arr = program(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"x must have shape \(batch >= 1, 4\)"):
        arr.mvm(np.ones((2, 5)))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        arr.mvm(np.ones(4))
    with pytest.raises(ValueError, match="x contains 1 non-finite"):
        arr.mvm(np.array([[1.0, np.nan, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="W must have 2 dimensions"):
        program(np.ones(3))
    with pytest.raises(TypeError, match="config must be a CrossbarConfig"):
        CrossbarArray(np.ones((2, 2)), {"out_noise": 0.1})


def test_zero_input_and_zero_weights():
    arr = program(np.zeros((3, 4)), CrossbarConfig(g_levels=8), seed=0)
    assert np.array_equal(arr.mvm(np.ones((2, 4))), np.zeros((2, 3)))
    # programming noise makes even a zero matrix conduct (noise clamped at g = 0)
    g_pos = program(np.zeros((3, 4)), CrossbarConfig.realistic(out_noise=0.0), seed=0).conductances.g_pos
    assert np.any(g_pos > 0) and np.all(g_pos >= 0)
    arr = program(np.ones((3, 4)))
    assert np.array_equal(arr.mvm(np.zeros((2, 4))), np.zeros((2, 3)))


maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731


@st.composite
def crossbar_cases(draw):
    cfg = CrossbarConfig(
        dac_bits=draw(maybe(st.integers(2, 8))), inp_bound=draw(st.sampled_from([1.0, 0.5])),
        adc_bits=draw(maybe(st.integers(3, 9))), out_bound=draw(st.sampled_from([0.5, 2.0, 12.0])),
        noise_management=draw(st.sampled_from(["absmax", "none"])),
        bound_management=draw(st.booleans()), bm_max_rounds=draw(st.integers(0, 3)),
        out_noise=draw(st.sampled_from([0.0, 0.05])), w_noise=draw(st.sampled_from([0.0, 0.03])),
        w_noise_type=draw(st.sampled_from(["additive", "proportional"])),
        prog_noise=draw(st.sampled_from([0.0, 1.0])), prog_noise_type=draw(st.sampled_from(["pcm", "gaussian"])),
        g_levels=draw(maybe(st.integers(2, 33))), ir_drop=draw(st.sampled_from([0.0, 1e-3])),
        tile_rows=draw(st.integers(1, 6)), tile_cols=draw(st.integers(1, 5)), dtype="float64")
    if cfg.prog_noise_type == "gaussian" and cfg.prog_noise > 0:
        cfg = CrossbarConfig.from_dict({**cfg.to_dict(), "prog_noise": 0.02})
    out_f, in_f, batch = draw(st.integers(1, 7)), draw(st.integers(1, 9)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out_f, in_f)) * draw(st.sampled_from([0.1, 1.0, 5.0]))
    x = rng.standard_normal((batch, in_f)) * draw(st.sampled_from([0.1, 1.0, 4.0]))
    return cfg, W, x, seed


@settings(max_examples=40, deadline=None)
@given(crossbar_cases(), st.booleans())
def test_kernels_match_reference(case, force_parallel):
    cfg, W, x, seed = case
    arr = program(W, cfg, seed=seed)
    twin = ref.ReferenceCrossbar(W, cfg, seed)
    saved = crossbar.PARALLEL_MIN_WORK
    for _ in range(2):  # the second call uses a fresh read-noise key
        try:
            crossbar.PARALLEL_MIN_WORK = 0 if force_parallel else saved
            y = arr.mvm(x)
        finally:
            crossbar.PARALLEL_MIN_WORK = saved
        y_ref = twin.mvm(x)
        scale = (np.abs(x).max() + 1e-300) * np.abs(W).max()
        # same formulas in float64, summed in another order: agreement to rounding
        assert np.allclose(y, y_ref, rtol=1e-12, atol=1e-12 * scale)
        assert arr.stats.clipped_outputs == twin.clipped_outputs
