"""The crossbar's physical models: counter-based normals, programming, IR drop."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.conductance import apply_ir_drop, ir_drop_attenuation, pair_layout
from qs4d_np.hardware.crossbar import program
from qs4d_np.hardware.rng import derive_key, gaussian_block
from reference import crossbar as ref


@settings(max_examples=15, deadline=None)
@given(key=st.integers(0, 2 ** 64 - 1), row0=st.integers(0, 2 ** 40), counters=st.lists(st.integers(0, 50), max_size=3))
def test_counter_normals_match_reference(key, row0, counters):
    key = int(derive_key(key, *counters))
    rows = np.arange(row0, row0 + 30)
    fast = gaussian_block(key, rows, 40)
    slow = np.array([[ref.gaussian(key, int(r), i) for i in range(40)] for r in rows])
    # identical integer hashing; the rare wedge/tail paths call libm log/exp,
    # which may differ by an ulp between Numba (LLVM) and Python's math
    assert np.allclose(fast, slow, rtol=0, atol=1e-12)


def test_derive_key_matches_reference():
    for key, counters in [(0, ()), (5, (1,)), (2 ** 63 + 7, (3, 9)), (123, (0, 0, 0))]:
        assert int(derive_key(key, *counters)) == ref.derive_key(key, *counters)


def test_counter_normals_are_standard_normal():
    z = gaussian_block(2024, np.arange(2000), 500).ravel()
    # 1e6 draws: standard errors 1e-3 (mean) and 7e-4 (std)
    assert abs(z.mean()) < 5e-3 and abs(z.std() - 1) < 4e-3
    assert stats.kstest(z, "norm").pvalue > 1e-4
    for t in (2.0, 3.0, 3.5):  # layer edges and the tail beyond r = 3.44
        expected = 2 * stats.norm.sf(t)
        assert abs(np.mean(np.abs(z) > t) / expected - 1) < 5 / np.sqrt(expected * z.size)
    # neighbouring columns and rows are uncorrelated
    m = z.reshape(2000, 500)
    assert abs(np.corrcoef(m[:, :-1].ravel(), m[:, 1:].ravel())[0, 1]) < 5e-3
    assert abs(np.corrcoef(m[:-1].ravel(), m[1:].ravel())[0, 1]) < 5e-3


def test_counter_normals_depend_only_on_the_counter():
    full = gaussian_block(77, np.arange(50), 9)
    assert np.array_equal(gaussian_block(77, np.array([41, 3, 3]), 9), full[[41, 3, 3]])
    assert not np.array_equal(gaussian_block(78, np.arange(50), 9), full)
    with pytest.raises(ValueError, match="rows"):
        gaussian_block(1, np.array([-1]), 3)


def test_conductance_mapping_and_levels():
    W = np.array([[1.0, -0.5, 0.26], [0.0, -2.0, 0.74]])
    arr = program(W, CrossbarConfig(g_levels=5))
    cond = arr.conductances
    # absmax 2 -> g = W/2, levels k/4 rounded half to even: 0.13*4 = 0.52 -> 1, 0.37*4 = 1.48 -> 1
    assert np.array_equal(cond.g_pos, [[2, 0, 1], [0, 0, 1]])
    assert np.array_equal(cond.g_neg, [[0, 1, 0], [0, 4, 0]])
    assert cond.g_unit == 0.25 and cond.w_absmax == 2.0
    assert np.allclose(arr.weights, [[1.0, -0.5, 0.5], [0.0, -2.0, 0.5]])
    assert np.allclose(program(W, CrossbarConfig(dtype="float64")).weights, W, rtol=1e-15, atol=0)
    g_pos_uS, g_neg_uS = program(W, CrossbarConfig(g_levels=5, g_max=20.0)).conductances_uS()
    assert np.array_equal(g_pos_uS, [[10.0, 0, 5.0], [0, 0, 5.0]]) and g_neg_uS.max() == 20.0


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 7), cols=st.integers(1, 10), rho=st.floats(0.0, 2e-3), seed=st.integers(0, 2 ** 32 - 1))
def test_ir_drop_matches_double_sum_definition(rows, cols, rho, seed):
    g = np.random.default_rng(seed).uniform(0, 1, (rows, cols))
    # cumulative sums vs the min/max double sums: agreement to float64 rounding
    assert np.allclose(ir_drop_attenuation(g, rho), ref.ir_drop_first_order(g, rho), rtol=0, atol=1e-13)


def test_ir_drop_first_order_error_is_quadratic():
    rng = np.random.default_rng(1)
    g = rng.uniform(0, 1, (6, 8))
    v = rng.uniform(-1, 1, 6)
    errors = []
    for rho in (1e-3, 5e-4, 2.5e-4):
        exact = ref.ir_drop_exact(g, v, rho)
        first = (g * ir_drop_attenuation(g, rho)).T @ v
        errors.append(np.abs(first - exact).max())
        # the first-order model removes most of the deviation from the ideal product
        assert errors[-1] < 0.05 * np.abs(g.T @ v - exact).max()
    assert 3.5 < errors[0] / errors[1] < 4.5 and 3.5 < errors[1] / errors[2] < 4.5


def test_ir_drop_in_the_array():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((5, 7))
    arr = program(W, CrossbarConfig(ir_drop=1e-3, dtype="float64"))
    g_pos, g_neg = apply_ir_drop(np.clip(W, 0, None) / np.abs(W).max(), np.clip(-W, 0, None) / np.abs(W).max(),
                                 1.0, 1e-3)
    assert np.allclose(arr.weights, (g_pos - g_neg) * np.abs(W).max(), rtol=0, atol=1e-13)
    assert pair_layout(g_pos, g_neg).shape == (7, 10)
    with pytest.raises(ValueError, match="ir_drop"):
        program(np.ones((64, 64)), CrossbarConfig(ir_drop=1e-3))
