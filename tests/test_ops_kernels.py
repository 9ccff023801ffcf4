"""Hypothesis property tests: every Numba kernel against its float64 twin in reference/ops.py."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qs4d_np.kernels import elementwise as ew
from qs4d_np.kernels import matmul as mm
from qs4d_np.kernels import norm as nk
from reference import ops as ref

SETTINGS = settings(max_examples=25, deadline=None)
# each kernel is compiled parallel and serial (kernels.elementwise.row_kernel); the tests draw either
VARIANT = st.sampled_from(["parallel", "serial"])


@st.composite
def matrices(draw, even_cols=False, max_rows=2100):
    """Random (rows, cols) float64 data; rows can exceed one ROW_BLOCK to exercise blocking."""
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, 6)) * (2 if even_cols else 1)
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, cols)) * scale, rng


# float64 kernels vs float64 twins differ only by rounding order: 1e-12 relative.
RTOL, ATOL = 1e-12, 1e-12


@SETTINGS
@given(matrices(), VARIANT)
def test_gelu_kernels(data, variant):
    x, rng = data
    g = rng.standard_normal(x.shape)
    out, cdf = np.empty_like(x), np.empty_like(x)
    getattr(ew.gelu_forward, variant)(x.reshape(-1), out.reshape(-1), cdf.reshape(-1))
    np.testing.assert_allclose(out, ref.gelu(x), rtol=RTOL, atol=ATOL)
    getattr(ew.gelu_backward, variant)(x.reshape(-1), cdf.reshape(-1), g.reshape(-1), out.reshape(-1))
    np.testing.assert_allclose(out, ref.gelu_backward(x, g), rtol=RTOL, atol=ATOL)


@SETTINGS
@given(matrices(even_cols=True), VARIANT)
def test_glu_kernels(data, variant):
    z, rng = data
    bias = rng.standard_normal(z.shape[1])
    g = rng.standard_normal((z.shape[0], z.shape[1] // 2))
    out, gate = np.empty_like(g), np.empty_like(g)
    getattr(ew.glu_forward, variant)(z, bias, out, gate)
    np.testing.assert_allclose(out, ref.glu(z, bias), rtol=RTOL, atol=ATOL)
    dz = np.empty_like(z)
    dbias = getattr(ew.glu_backward, variant)(z, bias, gate, g, dz)
    rdz, rdb = ref.glu_backward(z, g, bias)
    np.testing.assert_allclose(dz, rdz, rtol=RTOL, atol=ATOL)
    # sums over up to ~2k rows: rounding grows with the row count
    np.testing.assert_allclose(dbias, rdb, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 30), st.integers(1, 5), st.integers(0, 2**32 - 1), VARIANT)
def test_channel_mask_kernel(b, l, h, seed, variant):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, l, h))
    mask = (rng.random((b, h)) > 0.5) * 2.0
    out = np.empty_like(x)
    getattr(ew.channel_mask_apply, variant)(x, mask, out)
    np.testing.assert_array_equal(out, ref.channel_mask_apply(x, mask))


@pytest.mark.parametrize("variant", ["parallel", "serial"])
def test_float32_kernels_track_float64(variant):
    """float32 data: kernels compute internally in float64, so the error is float32 rounding."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3000, 8))
    z32 = z.astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    out = np.empty((3000, 4), np.float32)
    getattr(ew.glu_forward, variant)(z32, bias, out, np.empty_like(out))
    np.testing.assert_allclose(out, ref.glu(z32, bias), rtol=1e-6, atol=1e-6)
    out = np.empty_like(z32)
    getattr(ew.gelu_forward, variant)(z32.reshape(-1), out.reshape(-1), np.empty_like(out).reshape(-1))
    np.testing.assert_allclose(out, ref.gelu(z32), rtol=1e-6, atol=1e-6)


# float32 data go through the float32 approximations in kernels.elementwise (exp_f32,
# the fitted erfc). Bounds: float32 output rounding (6e-8 relative) plus the
# approximation error, measured at <= 4e-7 absolute for GELU and its derivative
# over x in [-20, 20] (largest near |x| ~ 1, from rounding in the degree-9
# polynomial) and <= 1.5e-7 relative for exp and the sigmoid.
@st.composite
def float32_values(draw, max_size=3000):
    n = draw(st.integers(1, max_size))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.5, 2.0, 8.0]))
    return (rng.standard_normal(n) * scale).astype(np.float32), rng


@SETTINGS
@given(float32_values(), VARIANT)
def test_float32_gelu_approximation(data, variant):
    x, rng = data
    g = rng.standard_normal(x.size).astype(np.float32)
    out, cdf = np.empty_like(x), np.empty_like(x)
    getattr(ew.gelu_forward, variant)(x, out, cdf)
    want = ref.gelu(x)
    assert np.all(np.abs(out - want) <= 4e-7 + 1e-7 * np.abs(want))
    dx = np.empty_like(x)
    getattr(ew.gelu_backward, variant)(x, cdf, g, dx)
    want = ref.gelu_backward(x, g)
    assert np.all(np.abs(dx - want) <= 4e-7 * np.abs(g) + 1e-7 * np.abs(want))


def test_float32_gelu_tails_and_extremes():
    """Far tails: Phi stays in [0, 1], GELU(x) -> x and -> 0, nothing overflows to NaN."""
    x = np.array([-1e30, -200.0, -30.0, -9.0, 0.0, 9.0, 30.0, 200.0, 1e30], np.float32)
    out, cdf = np.empty_like(x), np.empty_like(x)
    ew.gelu_forward(x, out, cdf)
    assert np.all((cdf >= 0) & (cdf <= 1)) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out[5:], x[5:], rtol=1e-7)
    assert np.all(np.abs(out[:4]) <= 1e-15)
    assert out[4] == 0.0


@SETTINGS
@given(float32_values(), st.sampled_from([1.0, 30.0]))
def test_float32_exp_and_sigmoid(data, spread):
    x, _ = data
    y = np.clip(x * np.float32(spread), -87, 88)
    got = np.array([ew.exp_f32(v) for v in y[:200]])
    want = np.exp(y[:200].astype(np.float64))
    assert np.all(np.abs(got - want) <= 1.5e-7 * want)
    z = np.stack([np.ones_like(y), y], axis=1)  # GLU with a = 1: out = sigmoid(y)
    out, gate = np.empty((len(y), 1), np.float32), np.empty((len(y), 1), np.float32)
    ew.glu_forward(z, np.zeros(2, np.float32), out, gate)
    want = 1.0 / (1.0 + np.exp(-y.astype(np.float64)))
    assert np.all(np.abs(gate[:, 0] - want) <= 1.5e-7 * want + 1e-30)


@SETTINGS
@given(matrices(), VARIANT)
def test_layernorm_kernels(data, variant):
    x, rng = data
    c = x.shape[1]
    w, b, g = rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(x.shape)
    out, mean, rstd = np.empty_like(x), np.empty(len(x)), np.empty(len(x))
    getattr(nk.layernorm_forward, variant)(x, w, b, 1e-5, out, mean, rstd)
    ry, rmean, rrstd = ref.layernorm(x, w, b, 1e-5)
    np.testing.assert_allclose(out, ry, rtol=1e-10, atol=1e-10)  # 1/sqrt(var+eps) amplifies rounding
    np.testing.assert_allclose(rstd, rrstd, rtol=1e-12)
    dx = np.empty_like(x)
    dw, db = getattr(nk.layernorm_backward, variant)(x, w, mean, rstd, g, dx)
    rdx, rdw, rdb = ref.layernorm_backward(x, w, 1e-5, g)
    np.testing.assert_allclose(dx, rdx, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dw, rdw, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(db, rdb, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(matrices(max_rows=2100).filter(lambda d: d[0].shape[0] >= 2), VARIANT)
def test_batchnorm_kernels(data, variant):
    x, rng = data
    c = x.shape[1]
    w, b, g = rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(x.shape)
    mean, var = getattr(nk.column_moments, variant)(x)
    ry, rmean, rvar = ref.batchnorm_train(x, w, b, 1e-5)
    np.testing.assert_allclose(mean, rmean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(var, rvar, rtol=1e-10)
    rstd = 1.0 / np.sqrt(var + 1e-5)
    out = np.empty_like(x)
    getattr(nk.column_affine, variant)(x, w * rstd, b - mean * w * rstd, out)
    np.testing.assert_allclose(out, ry, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(out, ref.column_affine(x, w * rstd, b - mean * w * rstd), rtol=1e-13, atol=1e-13)
    dx = np.empty_like(x)
    dw, db = getattr(nk.batchnorm_backward, variant)(x, w, mean, rstd, g, dx)
    rdx, rdw, rdb = ref.batchnorm_train_backward(x, w, 1e-5, g)
    np.testing.assert_allclose(dx, rdx, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dw, rdw, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(db, rdb, rtol=1e-10, atol=1e-10)


def test_parallel_and_serial_agree_bitwise_above_threshold():
    """Column sums use fixed row blocks, so the thread count cannot change a single bit."""
    rng = np.random.default_rng(1)
    rows = ew.PARALLEL_MIN_SIZE // 16 + 3000
    z = rng.standard_normal((rows, 32)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    g = rng.standard_normal((rows, 16)).astype(np.float32)
    gate = np.empty((rows, 16), np.float32)
    ew.glu_forward(z, bias, np.empty_like(gate), gate)  # dispatches to the parallel variant
    results = []
    for kern in (ew.glu_backward.parallel, ew.glu_backward.serial):
        dz = np.empty_like(z)
        results.append((kern(z, bias, gate, g, dz), dz))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    x = z[:, :16].copy()
    w = rng.standard_normal(16).astype(np.float32)
    mean, rstd = np.empty(rows), np.empty(rows)
    nk.layernorm_forward(x, w, w, 1e-5, np.empty_like(x), mean, rstd)
    par = nk.layernorm_backward.parallel(x, w, mean, rstd, g, np.empty_like(x))
    ser = nk.layernorm_backward.serial(x, w, mean, rstd, g, np.empty_like(x))
    for a, b in zip(par, ser):
        np.testing.assert_array_equal(a, b)


@SETTINGS
@given(st.integers(1, 300), st.integers(1, 20), st.integers(1, 20), st.integers(0, 2**32 - 1),
       st.sampled_from([0, 1 << 62]))
def test_row_split_matmuls(rows, k, n, seed, min_flops):
    """Split (threshold 0) and unsplit (huge threshold) products against float64 a @ b."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = rng.standard_normal((rows, n)).astype(np.float32)
    saved = mm.MIN_SPLIT_FLOPS
    mm.MIN_SPLIT_FLOPS = min_flops
    try:
        ab = mm.matmul(a, b)
        out = np.empty((rows, n), np.float32)
        assert mm.matmul(a, b, out=out) is out
        atc = mm.matmul_tn(a, c)
    finally:
        mm.MIN_SPLIT_FLOPS = saved
    # float32 products: error ~ sqrt(terms) * 6e-8 * |a||b|, far below 1e-4 of the
    # largest possible magnitude (sum of |a_i||b_i|)
    bound_ab = 1e-5 * (np.abs(a).astype(np.float64) @ np.abs(b)) + 1e-6
    assert np.all(np.abs(ab - ref.linear(a, b)) <= bound_ab)
    np.testing.assert_array_equal(out, ab)
    bound_tc = 1e-5 * (np.abs(a).T.astype(np.float64) @ np.abs(c)) + 1e-6
    assert np.all(np.abs(atc - ref.linear(a.T, c)) <= bound_tc)
    assert ab.dtype == atc.dtype == np.float32


@pytest.mark.parametrize("min_flops", [0, 1 << 62])
def test_run_row_chunks_covers_rows_once(min_flops):
    saved = mm.MIN_SPLIT_FLOPS
    mm.MIN_SPLIT_FLOPS = min_flops
    try:
        hits = np.zeros(101, int)

        def mark(lo, hi):
            hits[lo:hi] += 1

        mm.run_row_chunks(mark, 101, 10**9)
    finally:
        mm.MIN_SPLIT_FLOPS = saved
    np.testing.assert_array_equal(hits, 1)


def test_matmul_tn_checks_rows():
    with pytest.raises(ValueError, match=r"b must have 3 rows like a, got shape \(4, 2\)"):
        mm.matmul_tn(np.zeros((3, 2)), np.zeros((4, 2)))


def _split_product_in_child(seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((5000, 64)).astype(np.float32)
    b = rng.standard_normal((64, 64)).astype(np.float32)
    return float(np.abs(mm.matmul(a, b) - a @ b).max())


def test_matmul_pool_survives_fork():
    """A child forked after the pool started gets its own pool (the parent's threads do not exist there)."""
    import multiprocessing

    _split_product_in_child(0)  # starts the parent's pool (5000*64*64*2 flops > MIN_SPLIT_FLOPS)
    assert mm._state
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_split_product_in_child, (1,)).get(timeout=60) < 1e-3
