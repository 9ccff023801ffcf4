"""Fake quantization: grids, rounding rules, the Numba kernels against reference/quant.py, bad input."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qs4d_np.quant.fake import QuantSpec, fake_quant, quantize, ste_backward
from qs4d_np.quant.grids import ROUNDING, make_grid
from reference.quant import fake_quant_ref, round_ref, ste_backward_ref

SETTINGS = settings(max_examples=25, deadline=None)


def _x(seed, shape, dtype=np.float64, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(dtype)


# -- grids and rounding --------------------------------------------------------
def test_grid_ranges_and_bits():
    # n = 2**b: narrow and full fit b bits, the reference grid needs b+1
    assert (make_grid("narrow", 256).qmin, make_grid("narrow", 256).qmax, make_grid("narrow", 256).bits) == (-127, 127, 8)
    assert (make_grid("qs4d", 256).qmin, make_grid("qs4d", 256).qmax, make_grid("qs4d", 256).bits) == (-128, 128, 9)
    assert (make_grid("full", 256).qmin, make_grid("full", 256).qmax, make_grid("full", 256).bits) == (-128, 127, 8)
    assert make_grid("qs4d", 2).n_codes == 3  # the reference's n = 2 is ternary
    assert (make_grid("qs4d", 5).qmin, make_grid("qs4d", 5).qmax) == (-3, 2)  # odd n: lopsided
    assert (make_grid("narrow", 3).n_codes, make_grid("narrow", 3).bits) == (3, 2)
    assert make_grid("narrow", 6, symmetric=False).n_codes == 6  # asymmetric uses all n codes


@pytest.mark.parametrize("rounding, expected", [
    ("half_even", [-2, -2, -0, 0, 2, 2, 0, -0, 2, -1]),
    ("half_up", [-2, -1, -0, 1, 2, 3, 0, -0, 2, -1]),
    ("half_away", [-3, -2, -1, 1, 2, 3, 0, -0, 2, -1]),
    ("floor", [-3, -2, -1, 0, 1, 2, 0, -1, 2, -2]),
])
def test_rounding_rules_by_hand(rounding, expected):
    # the last four are one ulp off a tie: they must not be moved like ties
    v = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49999999999999994, -0.49999999999999994,
                  2.5 - 2**-51, -1.5 + 2**-52])
    assert np.array_equal(round_ref(v, rounding), expected)
    # through the kernel: a fixed range of 4 on 8 full-grid states gives inv = 1
    out = fake_quant(v, 8, grid="full", scale_mode="fixed", fixed_range=4.0, rounding=rounding)
    assert np.array_equal(out, expected)


# -- the reference formula (SPEC.md section 2) -------------------------------------
def _spec_formula(w, n):
    """scale = (n/2)/max|w| (floored at 1e-5), clamp(round_half_even(w*scale), -n//2, n//2)/scale,
    computed in w's dtype as the reference does in torch; Python's -n//2 floors (lopsided odd n)."""
    dt = w.dtype.type
    scale = dt(n / 2) / np.maximum(np.abs(w).max(), dt(1e-5))
    return (np.clip(np.round(w * scale), -n // 2, n // 2) / scale).astype(w.dtype)


def test_qs4d_grid_ties_by_hand():
    w = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 4.0])  # n = 8: scale = 4/4 = 1, so w*scale = w exactly
    assert np.array_equal(fake_quant(w, 8, grid="qs4d"), [0.0, 2.0, 2.0, 0.0, -2.0, 4.0])
    assert np.array_equal(_spec_formula(w, 8), [0.0, 2.0, 2.0, 0.0, -2.0, 4.0])


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 300), dtype=st.sampled_from([np.float32, np.float64]),
       size=st.integers(1, 60), tiny=st.booleans())
def test_qs4d_grid_matches_spec_formula(seed, n, dtype, size, tiny):
    w = _x(seed, (size,), dtype, scale=1e-7 if tiny else 1.0)  # tiny: the 1e-5 floor is active
    assert np.array_equal(fake_quant(w, n, grid="qs4d"), _spec_formula(w, n))


# -- kernels against the twin ----------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 70), grid=st.sampled_from(["narrow", "qs4d", "full"]),
       symmetric=st.booleans(), per_channel=st.booleans(), scale_mode=st.sampled_from(["absmax", "absmean", "fixed"]),
       rounding=st.sampled_from(["half_even", "half_up", "half_away", "floor"]), p2=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64, np.complex64, np.complex128]),
       complex_mode=st.sampled_from(["cartesian", "shared"]), shape=st.sampled_from([(5,), (3, 4), (2, 3, 5)]))
def test_kernel_matches_twin(seed, n, grid, symmetric, per_channel, scale_mode, rounding, p2, dtype, complex_mode, shape):
    assume(scale_mode != "absmean" or symmetric)  # absmean ranges are symmetric only
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * rng.uniform(0.01, 10)
    if np.dtype(dtype).kind == "c":
        x = x + 1j * rng.normal(size=shape) * 3
    x = x.astype(dtype)
    axis = int(rng.integers(-len(shape), len(shape))) if per_channel else None
    fixed = None
    if scale_mode == "fixed":  # a range that cuts some entries, one value per scale
        lay = QuantSpec(n, axis=axis, complex_mode=complex_mode).layout(x)
        r = rng.uniform(0.5, 2.0, lay.channels)
        fixed = r if symmetric else (-r * rng.uniform(0, 1, lay.channels), r)
    opts = dict(grid=grid, symmetric=symmetric, axis=axis, scale_mode=scale_mode, fixed_range=fixed,
                rounding=rounding, power_of_two=p2, complex_mode=complex_mode)
    got = quantize(x, n, **opts)
    want, q, inv, zp = fake_quant_ref(x, n, **opts)
    assert got.dequantize().dtype == x.dtype
    assert np.array_equal(got.q, q) and np.array_equal(got.zero_point, zp)
    if scale_mode == "absmean":
        # the kernel sums |x| blockwise, np.mean pairwise: the scales may differ in the last
        # bit (codes would only differ for a value within ~1e-16 of a rounding boundary)
        rtol = 4 * np.finfo(got.dequantize().real.dtype).eps
        np.testing.assert_allclose(got.inv_scale, inv.astype(np.float64), rtol=rtol, atol=0)
        np.testing.assert_allclose(got.dequantize(), want, rtol=rtol, atol=0)
        return
    assert np.array_equal(got.dequantize(), want)
    assert np.array_equal(fake_quant(x, n, **opts), want)
    assert np.array_equal(got.inv_scale, inv.astype(np.float64))


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("dtype", [np.float32, np.complex128])
def test_kernels_across_blocks(axis, dtype):
    """> CHUNK elements with a last axis (19) that does not divide CHUNK: runs cross block
    and row boundaries; forward, clipped STE and LSQ step against NumPy formulas."""
    rng = np.random.default_rng(12)
    shape = (130, 7, 19)
    x = rng.normal(size=shape) * rng.uniform(0.1, 3.0, size=shape[-1])
    if np.dtype(dtype).kind == "c":
        x = x + 1j * rng.normal(size=shape)
    x = x.astype(dtype)
    opts = dict(axis=axis, rounding="half_away", symmetric=axis != 0)
    got = quantize(x, 21, **opts)
    want, q, inv, zp = fake_quant_ref(x, 21, **opts)
    assert np.array_equal(got.q, q) and np.array_equal(got.dequantize(), want)
    # backward with a fixed range that cuts about half of the entries
    spec = QuantSpec(21, axis=axis)
    lay = spec.layout(x)
    r = np.full(lay.channels, 0.7)
    _, state = spec.forward(x, scale_mode="fixed", fixed_range=r)
    g = (rng.normal(size=shape) + (1j * rng.normal(size=shape) if np.iscomplexobj(x) else 0)).astype(dtype)
    dx, dstep = ste_backward(g, x, state, "clipped", want_step=True)
    parts = lambda a: np.stack([a.real, a.imag]) if np.iscomplexobj(a) else a  # noqa: E731
    xs, gs = parts(x).astype(np.float64), parts(g).astype(np.float64)
    inv_b = lay.broadcast(state.inv).astype(np.float64)
    v = parts(x) * lay.broadcast(state.inv)  # in x's dtype, as the kernel
    code = np.rint(v)
    inside = np.abs(code) <= 10
    np.testing.assert_array_equal(parts(dx), np.where(inside, gs, 0.0).astype(parts(dx).dtype))
    d = np.where(inside, code - v, np.sign(code) * 10).astype(np.float64)
    per = (gs * d)
    red = tuple(i for i in range(per.ndim) if inv_b.shape[i] == 1)
    want_step = per.sum(axis=red).reshape(-1)
    np.testing.assert_allclose(dstep, want_step, rtol=1e-9, atol=1e-9)  # float64 sums, other order
    assert 0.2 < inside.mean() < 0.9 and xs.size > 16384


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 40), grid=st.sampled_from(["narrow", "qs4d", "full"]),
       symmetric=st.booleans(), per_channel=st.booleans(),
       rounding=st.sampled_from(["half_even", "half_up", "half_away", "floor"]),
       dtype=st.sampled_from([np.float32, np.float64, np.complex64]), complex_mode=st.sampled_from(["cartesian", "shared"]),
       shape=st.sampled_from([(7,), (3, 5), (2, 3, 4)]), keep_codes=st.booleans())
def test_ste_backward_kernel_matches_twin(seed, n, grid, symmetric, per_channel, rounding, dtype, complex_mode, shape,
                                          keep_codes):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 2
    if np.dtype(dtype).kind == "c":
        x = x + 1j * rng.normal(size=shape) * 2
    x = x.astype(dtype)
    x.flat[0] = 25.0  # far outside every range below: each example has saturated codes
    x.flat[-1] = 0.0  # and one inside (zero is on every grid)
    axis = int(rng.integers(-len(shape), len(shape))) if per_channel else None
    spec = QuantSpec(n, grid=grid, symmetric=symmetric, axis=axis, rounding=rounding, complex_mode=complex_mode)
    lay = spec.layout(x)
    r = rng.uniform(0.5, 2.0, lay.channels)  # a range that cuts part of the normal values too
    fixed = r if symmetric else (-r * rng.uniform(0, 1, lay.channels), r)
    _, state = spec.forward(x, scale_mode="fixed", fixed_range=fixed, want_codes=keep_codes)
    grad = (rng.normal(size=shape) + (1j * rng.normal(size=shape) if np.dtype(dtype).kind == "c" else 0)).astype(dtype)
    dx, dstep = ste_backward(grad, x, state, "clipped", want_step=True)
    qmin, qmax = state.grid.bounds(lay.flatten(x).dtype)
    want_dx, want_step = ste_backward_ref(lay.flatten(x), lay.flatten(grad), state.inv, state.zp, float(qmin),
                                          float(qmax), {v: k for k, v in ROUNDING.items()}[state.mode],
                                          lay.G, lay.P, lay.C, lay.Q, state.codes)
    assert (want_dx == 0).any() and (want_dx != 0).any()  # both sides of the clip are exercised
    assert np.array_equal(lay.flatten(dx), want_dx)
    # the same float64 terms summed per run in the kernel and in index order here: the sums of
    # <= 48 terms per channel differ by at most n * eps * sum |terms|
    terms = np.abs(lay.flatten(grad)).astype(np.float64) * (np.abs(lay.flatten(x)) * state.inv.max()
                                                            + abs(qmin) + abs(qmax) + np.abs(state.zp).max())
    np.testing.assert_allclose(dstep, want_step, rtol=0, atol=x.size * np.finfo(np.float64).eps * terms.sum())


# -- properties ------------------------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 40), symmetric=st.booleans(),
       rounding=st.sampled_from(["half_even", "half_up", "half_away", "floor"]), per_channel=st.booleans(),
       p2=st.booleans())
def test_narrow_grid_at_most_n_levels_and_idempotent(seed, n, symmetric, rounding, per_channel, p2):
    # floor is idempotent only when (q/inv)*inv is exact, i.e. with power-of-two scales:
    # otherwise q/inv*inv can land one ulp below q and floor to q - 1
    p2 = p2 or rounding == "floor"
    x = _x(seed, (4, 50))
    axis = 0 if per_channel else None
    qt = quantize(x, n, symmetric=symmetric, rounding=rounding, axis=axis, power_of_two=p2)
    for row in (qt.q if per_channel else qt.q.reshape(1, -1)):
        assert len(np.unique(row)) <= n
    g = make_grid("narrow", n, symmetric)
    assert qt.q.min() >= g.qmin and qt.q.max() <= g.qmax
    # quantizing again with the same scales changes nothing
    x_hat = qt.dequantize()
    spec = QuantSpec(n, symmetric=symmetric, rounding=rounding, axis=axis, power_of_two=p2)
    again, _ = spec.apply(
        x_hat, spec.layout(x_hat), qt.inv_scale.reshape(-1), qt.zero_point.reshape(-1).astype(np.float64))
    assert np.array_equal(again, x_hat)
    # and re-deriving the absmax scale from x_hat gives the same codes (a power-of-two step
    # leaves the top code unused, so x_hat's absmax then differs from x's)
    if symmetric and not p2:
        assert np.array_equal(quantize(x_hat, n, rounding=rounding, axis=axis).q, qt.q)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 1000), grid=st.sampled_from(["narrow", "qs4d", "full"]),
       p2=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]))
def test_error_at_most_half_a_step_inside_the_range(seed, n, grid, p2, dtype):
    x = _x(seed, (200,), dtype)
    qt = quantize(x, n, grid=grid, power_of_two=p2)
    inv = qt.inv_scale.item()
    v = x * dtype(inv)  # as the kernel computes it; values rounding onto an end code count as inside
    inside = (v >= qt.grid.qmin - 0.5) & (v <= qt.grid.qmax + 0.5)
    err = np.abs(qt.dequantize().astype(np.float64) - x)
    # half a step, plus the rounding of x*inv and of q/inv in the working dtype
    tol = 0.5 / inv * (1 + 4 * np.finfo(dtype).eps) + 2 * np.finfo(dtype).eps * np.abs(x)
    assert np.all(err[inside] <= tol[inside])
    if grid == "narrow" or (grid == "qs4d" and n % 2 == 0):  # absmax maps onto the top code: nothing cut
        assert inside.all()
    if p2:
        mant, _ = np.frexp(inv)
        assert mant == 0.5 and 1 / inv >= np.abs(x).max() / qt.grid.qpos


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 300), grid=st.sampled_from(["narrow", "qs4d"]),
       rounding=st.sampled_from(["half_even", "half_away"]))
def test_symmetric_grids_are_symmetric(seed, n, grid, rounding):
    if grid == "qs4d" and n % 2:
        n += 1  # odd n on the reference grid is lopsided by design
    x = _x(seed, (3, 40))
    assert np.array_equal(fake_quant(-x, n, grid=grid, rounding=rounding), -fake_quant(x, n, grid=grid, rounding=rounding))


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 64), axis=st.sampled_from([0, 1, 2, -1]),
       symmetric=st.booleans())
def test_per_channel_scales_independent_of_other_channels(seed, n, axis, symmetric):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 4, 5))
    y = x.copy()
    sl = [slice(None)] * 3
    sl[axis] = 0
    y[tuple(sl)] *= rng.uniform(5, 50)  # change channel 0 only
    a = fake_quant(x, n, axis=axis, symmetric=symmetric)
    b = fake_quant(y, n, axis=axis, symmetric=symmetric)
    other = [slice(None)] * 3
    other[axis] = slice(1, None)
    assert np.array_equal(a[tuple(other)], b[tuple(other)])
    assert not np.array_equal(a[tuple(sl)], b[tuple(sl)])


def test_complex_modes():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(4, 6)) + 1j * 0.01 * rng.normal(size=(4, 6))
    cart = fake_quant(z, 16)
    # cartesian: each part quantized as its own real tensor
    assert np.array_equal(cart.real, fake_quant(z.real, 16)) and np.array_equal(cart.imag, fake_quant(z.imag, 16))
    shared = fake_quant(z, 16, complex_mode="shared")
    both = fake_quant(np.stack([z.real, z.imag]), 16)
    assert np.array_equal(shared.real, both[0]) and np.array_equal(shared.imag, both[1])
    # the small imaginary part is crushed to zero by a shared scale, kept by its own
    assert np.all(shared.imag == 0) and np.count_nonzero(cart.imag) > 0


def test_asymmetric_zero_point_keeps_zero_and_uses_the_range():
    x = np.concatenate([np.linspace(0.0, 3.0, 50), [0.0]])
    qt = quantize(x, 16, symmetric=False)
    assert qt.dequantize()[-1] == 0.0
    assert qt.q.min() == qt.grid.qmin and qt.q.max() == qt.grid.qmax  # all 16 codes on [0, 3]
    sym = fake_quant(x, 16)
    assert np.abs(qt.dequantize() - x).max() < np.abs(sym - x).max()


# -- STE backward ----------------------------------------------------------------
def test_ste_identity_and_clipped_masks():
    x = np.array([-3.0, -0.4, 0.2, 0.9, 2.5])
    spec = QuantSpec(7)  # narrow: codes -3..3; range 1 -> inv = 3
    _, state = spec.forward(x, scale_mode="fixed", fixed_range=1.0)
    g = np.arange(1.0, 6.0)
    dx, _ = ste_backward(g, x, state, "identity")
    assert dx is g
    dx, _ = ste_backward(g, x, state, "clipped")
    assert np.array_equal(dx, [0.0, 2.0, 3.0, 4.0, 0.0])
    with pytest.raises(ValueError, match="grad must have shape"):
        ste_backward(g[:3], x, state, "clipped")
    # x must be the forward's tensor: a longer one would make the kernel read grad out of bounds
    with pytest.raises(ValueError, match=r"x must be the tensor the forward quantized, shape \(5,\) dtype "
                                         r"float64; got shape \(8,\) dtype float64"):
        ste_backward(g, np.zeros(8), state, "clipped")
    with pytest.raises(ValueError, match="got shape \\(5,\\) dtype float32"):
        ste_backward(g, x.astype(np.float32), state, "identity", want_step=True)


@pytest.mark.parametrize("dtype, levels", [(np.float32, 2**32), (np.float32, 2**25 + 1), (np.float64, 2**52)])
def test_codes_stay_on_the_grid_past_the_dtypes_exact_integers(dtype, levels):
    # float32(2**31 - 1) rounds up to 2**31: the clamp bound must not leave [qmin, qmax]
    x = np.array([1.0, -1.0, 0.3], dtype=dtype)
    for grid in ("narrow", "qs4d", "full"):
        qt = quantize(x, levels, grid=grid)
        g = qt.grid
        assert g.qmin <= qt.q.min() and qt.q.max() <= g.qmax, (grid, qt.q, g)
        assert -(2 ** (g.bits - 1)) <= qt.q.min() and qt.q.max() <= 2 ** (g.bits - 1) - 1
        # the clipped STE sees the same bounds: nothing in range counts as saturated
        _, state = QuantSpec(levels, grid=grid).forward(x, scale_mode="fixed", fixed_range=0.5)
        dx, _ = ste_backward(np.ones(3, dtype=dtype), x, state, "clipped")
        assert np.array_equal(dx, [0.0, 0.0, 1.0])
    g = make_grid("narrow", levels)
    lo, hi = g.bounds(np.dtype(dtype))  # the floats nearest to qmin / qmax from inside the grid
    # Python compares float with int exactly
    assert float(hi) <= g.qmax < float(np.nextafter(hi, dtype(np.inf)))
    assert float(np.nextafter(lo, dtype(-np.inf))) < g.qmin <= float(lo)


# -- bad input -------------------------------------------------------------------
def test_bad_input_errors_name_the_argument():
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="levels must be >= 2, got 1"):
        fake_quant(x, 1)
    with pytest.raises(TypeError, match="levels must be an integer"):
        fake_quant(x, 4.0)
    with pytest.raises(TypeError, match="levels must be an integer"):
        fake_quant(x, True)
    with pytest.raises(ValueError, match="levels=2 on the symmetric narrow grid"):
        fake_quant(x, 2)
    with pytest.raises(TypeError, match="unknown fake_quant option.*'bogus'"):
        fake_quant(x, 4, bogus=1)
    with pytest.raises(ValueError, match="rounding must be one of"):
        fake_quant(x, 4, rounding="nearest")
    with pytest.raises(ValueError, match="grid must be one of"):
        fake_quant(x, 4, grid="wide")
    with pytest.raises(ValueError, match="x contains 1 non-finite"):
        fake_quant(np.array([1.0, np.nan]), 4)
    with pytest.raises(ValueError, match="x contains 1 non-finite"):
        fake_quant(np.array([1.0, np.inf]), 4, scale_mode="fixed", fixed_range=1.0)
    with pytest.raises(ValueError, match="axis=2 does not exist for x with shape \\(2, 3\\)"):
        fake_quant(x, 4, axis=2)
    with pytest.raises(ValueError, match="needs fixed_range"):
        fake_quant(x, 4, scale_mode="fixed")
    with pytest.raises(ValueError, match="fixed_range .* 3 values"):
        fake_quant(x, 4, scale_mode="fixed", axis=1, fixed_range=[1.0, 2.0])
    with pytest.raises(TypeError, match="x must be float32/float64"):
        fake_quant(np.ones(3, dtype=np.int32), 4)
    with pytest.raises(TypeError, match="symmetric must be True or False, got 1"):
        fake_quant(x, 4, symmetric=1)
    with pytest.raises(TypeError, match="power_of_two must be True or False, got 0"):
        fake_quant(x, 4, power_of_two=0)
    with pytest.raises(ValueError, match="absmean' needs symmetric"):
        fake_quant(x, 4, symmetric=False, scale_mode="absmean")


def test_non_contiguous_input_is_quantized_by_its_logical_layout():
    x = np.random.default_rng(15).normal(size=(6, 5)) * np.arange(1, 6)
    view = x.T  # (5, 6), Fortran-ordered view
    assert np.array_equal(fake_quant(view, 9, axis=0), fake_quant(np.ascontiguousarray(view), 9, axis=0))
    assert np.array_equal(fake_quant(x[:, ::2], 9, axis=1), fake_quant(x[:, ::2].copy(), 9, axis=1))
