"""The modulus bound of complex quantization (``max_modulus``): kernel against its float64 twin
``reference/quant_disk.py``, the disk property, the nearest-corner rule, STE / LSQ gradients, bad input."""
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qs4d_np.quant.fake import QuantSpec, fake_quant, quantize
from qs4d_np.quant.quantizer import Quantizer
from reference.gradcheck import grad_error, numerical_grad
from reference.quant import fake_quant_ref, round_ref
from reference.quant_disk import bound_codes_ref, fake_quant_disk_ref

SETTINGS = settings(max_examples=30, deadline=None)
U = 2.0**-53  # unit roundoff of float64


def _disk_values(seed, shape, radius, dtype=np.complex128):
    """Complex values with |x| <= radius, many near the circle (where rounding leaves the disk)."""
    rng = np.random.default_rng(seed)
    r = radius * (1 - rng.uniform(0, 1, size=shape) ** 3)
    return (r * np.exp(1j * rng.uniform(-np.pi, np.pi, size=shape))).astype(dtype)


def _parts(t):
    """Centered codes k = q - zp and inv of a QuantTensor, float64, broadcast to (2,) + shape."""
    inv = np.broadcast_to(t.inv_scale, t.q.shape).astype(np.float64)
    return (t.q - t.zero_point).astype(np.float64), inv


def _mod2(k, inv):
    """The admissibility expression: (k_re/inv_re)^2 + (k_im/inv_im)^2 in float64, in this order."""
    a, b = k[0] / inv[0], k[1] / inv[1]
    return a * a + b * b


options = st.fixed_dictionaries({
    "grid": st.sampled_from(["narrow", "qs4d", "full"]),
    "rounding": st.sampled_from(["half_even", "half_up", "half_away", "floor"]),
    "axis": st.sampled_from([None, 0, 1]),
    "complex_mode": st.sampled_from(["cartesian", "shared"]),
    "power_of_two": st.booleans(),
})


# -- kernel vs twin ----------------------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), h=st.integers(1, 3), m=st.integers(1, 6),
       levels=st.sampled_from([3, 4, 5, 8, 9, 16, 17, 64]), radius=st.sampled_from([0.5, 1.0, 1.3]),
       max_modulus=st.sampled_from([1.0, 0.8, 2.5]), opts=options,
       scale=st.sampled_from(["absmax", "absmean", "fixed", "asym"]),
       dtype=st.sampled_from([np.complex64, np.complex128]))
def test_kernel_matches_float64_twin_bit_for_bit(seed, h, m, levels, radius, max_modulus, opts, scale, dtype):
    x = _disk_values(seed, (h, m), radius, dtype)
    kw = dict(opts)
    if scale == "asym":
        kw["symmetric"] = False
    elif scale == "fixed":
        kw.update(scale_mode="fixed", fixed_range=0.9)  # some parts saturate
    else:
        kw["scale_mode"] = scale
    out = fake_quant(x, levels, max_modulus=max_modulus, **kw)
    t = quantize(x, levels, max_modulus=max_modulus, **kw)
    assert np.array_equal(t.dequantize(), out) and out.dtype == x.dtype  # the golden model's codes
    # the bound step alone, from the kernel's own plain codes and scales: bit for bit
    plain = quantize(x, levels, **kw)
    real = x.real.dtype
    grid = QuantSpec(levels, grid=kw["grid"], symmetric=kw.get("symmetric", True)).code_grid
    inv, zp = plain.inv_scale.astype(real), plain.zero_point.astype(real)
    q_ref = bound_codes_ref(x, plain.q.astype(real), inv, zp, grid.qmin, grid.qmax, max_modulus)
    assert np.array_equal(t.q, q_ref.astype(np.int64))
    ref_parts = ((q_ref - zp) / inv).astype(real)
    assert np.array_equal(out, (ref_parts[0] + 1j * ref_parts[1]).astype(x.dtype))
    # end to end from the formulas of reference/quant.py (scales included)
    ref_out, ref_q, ref_inv, _ = fake_quant_disk_ref(x, levels, max_modulus, **kw)
    assert np.array_equal(t.q, ref_q.astype(np.int64))
    if kw.get("scale_mode") == "absmean":
        # the kernel sums |x| blockwise, np.mean pairwise: the scales (so the values) may differ in
        # the last bit, as in test_quant_fake's comparison of the plain quantizer
        rtol = 4 * np.finfo(real).eps
        np.testing.assert_allclose(out, ref_out, rtol=rtol, atol=0)
        return
    assert np.array_equal(out, ref_out)
    assert np.array_equal(np.broadcast_to(t.inv_scale, t.q.shape),
                          np.broadcast_to(ref_inv.astype(np.float64), t.q.shape))


# -- the disk ---------------------------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), h=st.integers(1, 3), m=st.integers(1, 6),
       levels=st.sampled_from([3, 4, 8, 16, 17, 256]), opts=options,
       dtype=st.sampled_from([np.complex64, np.complex128]))
def test_codes_stay_in_the_unit_disk_and_only_outside_codes_move(seed, h, m, levels, opts, dtype):
    x = _disk_values(seed, (h, m), 1.0, dtype)
    plain = quantize(x, levels, **opts)
    t = quantize(x, levels, max_modulus=1.0, **opts)
    k, inv = _parts(t)
    mod2 = _mod2(k, inv)
    assert (mod2 <= 1.0).all()  # the rule's own expression: no tolerance
    # exact rational modulus of the codes: the expression has 4 roundings (two quotients, two
    # products and the sum: relative error <= (1+u)^4 - 1 < 5u), so exact <= 1 + 5u
    for kr, ki, ir, ii in zip(k[0].ravel(), k[1].ravel(), inv[0].ravel(), inv[1].ravel()):
        assert (Fraction(kr) / Fraction(ir)) ** 2 + (Fraction(ki) / Fraction(ii)) ** 2 <= 1 + 5 * Fraction(U)
    # the scales are those of plain rounding, and codes whose plain rounding is inside do not move
    assert np.array_equal(t.inv_scale, plain.inv_scale)
    kp, _ = _parts(plain)
    inside = _mod2(kp, inv) <= 1.0
    assert np.array_equal(t.q[:, inside], plain.q[:, inside])
    # with m = 1 a moved code stays a neighbour of x*inv: each part moves by at most one code
    # (float64 input: the corner search itself never needs the fall-back walk here)
    if dtype == np.complex128:
        assert (np.abs(t.q - plain.q) <= 1).all()


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 8), levels=st.sampled_from([3, 8, 16, 32, 256]))
def test_shared_power_of_two_scales_bound_the_integer_codes_exactly(seed, m, levels):
    # one power-of-two inv for both parts: the dequantized values are exact, so the bound is the
    # integer inequality k_re^2 + k_im^2 <= inv^2 with no rounding anywhere
    x = _disk_values(seed, (2, m), 1.0)
    t = quantize(x, levels, max_modulus=1.0, complex_mode="shared", power_of_two=True, axis=0)
    inv = np.broadcast_to(t.inv_scale, t.q.shape)
    for kr, ki, iv in zip(t.q[0].ravel(), t.q[1].ravel(), inv[0].ravel()):
        assert float(iv) == 2.0 ** np.frexp(iv)[1] / 2
        assert int(kr) ** 2 + int(ki) ** 2 <= Fraction(float(iv)) ** 2


def _corners(u, z, qmin, qmax):
    """The two neighbours floor(u), ceil(u) of each part, saturated, as centered codes."""
    return sorted({min(max(c + z, qmin), qmax) - z for c in (np.floor(u), np.ceil(u))})


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 8), levels=st.sampled_from([3, 4, 8, 16, 17]),
       radius=st.sampled_from([1.0, 1.2]), axis=st.sampled_from([None, 0]),
       grid=st.sampled_from(["narrow", "qs4d", "full"]))
def test_moved_codes_are_the_nearest_admissible_corner_by_brute_force(seed, m, levels, radius, axis, grid):
    x = _disk_values(seed, (2, m), radius)
    spec = QuantSpec(levels, grid=grid, axis=axis, max_modulus=1.0)
    plain = quantize(x, levels, grid=grid, axis=axis)
    t = quantize(x, levels, grid=grid, axis=axis, max_modulus=1.0)
    g = spec.code_grid
    inv = np.broadcast_to(t.inv_scale, t.q.shape)
    moved = (t.q != plain.q).any(axis=0)
    for idx in zip(*np.nonzero(moved)):
        z = complex(x[idx])
        r2 = z.real * z.real + z.imag * z.imag
        if r2 > 1.0:  # projected onto the circle first (the rule's float64 formula)
            s = 1.0 / np.sqrt(r2)
            z = complex(z.real * s, z.imag * s)
        ir, ii = float(inv[0][idx]), float(inv[1][idx])
        best = None
        for kr in _corners(z.real * ir, 0, g.qmin, g.qmax):
            for ki in _corners(z.imag * ii, 0, g.qmin, g.qmax):
                if (kr / ir) ** 2 + (ki / ii) ** 2 <= 1.0:
                    d = (kr / ir - z.real) ** 2 + (ki / ii - z.imag) ** 2
                    best = d if best is None else min(best, d)
        kr, ki = float(t.q[0][idx]), float(t.q[1][idx])
        assert best is not None  # float64 input: some corner is admissible
        assert kr in _corners(z.real * ir, 0, g.qmin, g.qmax) and ki in _corners(z.imag * ii, 0, g.qmin, g.qmax)
        assert np.isclose((kr / ir - z.real) ** 2 + (ki / ii - z.imag) ** 2, best, rtol=1e-12, atol=0)


def test_hand_examples_nearest_corner_projection_and_tie_order():
    # 0.99 exp(0.3i) on 16 narrow states, range 1 (inv = 7): u = (6.62, 2.05) rounds to (7, 2),
    # |.| = sqrt(53)/7 > 1; admissible corners (6, 2), (6, 3); (6, 2) is nearer
    x = np.array([0.99 * np.exp(0.3j)])
    kw = dict(scale_mode="fixed", fixed_range=1.0)
    assert quantize(x, 16, **kw).q.ravel().tolist() == [7, 2]
    assert quantize(x, 16, max_modulus=1.0, **kw).q.ravel().tolist() == [6, 2]
    # 0.8 + 0.8i (|x| > 1): projected to u = (4.95, 4.95); (5, 5) is outside, (4, 5) and (5, 4) tie,
    # the earlier in the order (zero-ward re, outward im) wins
    x = np.array([0.8 + 0.8j])
    assert quantize(x, 16, **kw).q.ravel().tolist() == [6, 6]
    assert quantize(x, 16, max_modulus=1.0, **kw).q.ravel().tolist() == [4, 5]
    # outside the disk but rounding inside: kept (1.2 saturates to 7, |7/7| = 1)
    assert quantize(np.array([1.2 + 0j]), 16, max_modulus=1.0, **kw).q.ravel().tolist() == [7, 0]
    # a smaller disk: the bound is max_modulus, not 1
    t = quantize(np.array([0.5 + 0.5j]), 16, max_modulus=0.6, **kw)
    assert t.q.ravel().tolist() == [2, 3] and abs(t.dequantize()[0]) <= 0.6


def test_fall_back_walk_when_rounding_in_the_dtype_puts_every_corner_outside():
    # float32 x with |x| <= 1 whose products x*inv round (in float32) to the integers (2, 5), and
    # (2/inv)^2 + (5/inv)^2 > 1: the only corner is (2, 5) itself, so the larger part steps to 4
    inv = np.float32(5.385164737701416)
    x = np.array([np.float32(0.3713906705379486) + 1j * np.float32(0.9284766912460327)], dtype=np.complex64)
    assert float(x.real[0]) ** 2 + float(x.imag[0]) ** 2 <= 1.0
    assert (x.real * inv).tolist() == [2.0] and (x.imag * inv).tolist() == [5.0]
    assert (2 / float(inv)) ** 2 + (5 / float(inv)) ** 2 > 1.0
    spec = QuantSpec(16, max_modulus=1.0)
    lay = spec.layout(x)
    invs, zps = np.array([inv, inv]), np.zeros(2, dtype=np.float32)
    t = spec.apply(x, lay, invs, zps, want_codes=True)[1].tensor()
    assert t.q.ravel().tolist() == [2, 4]
    plain = QuantSpec(16).apply(x, lay, invs, zps, want_codes=True)[1].tensor()
    assert plain.q.ravel().tolist() == [2, 5]
    ref = bound_codes_ref(x, plain.q.astype(np.float32), np.full((2, 1), inv), np.zeros((2, 1), np.float32),
                          -7, 7, 1.0)
    assert ref.ravel().tolist() == [2, 4]


def test_none_reproduces_plain_codes_and_the_reference():
    x = _disk_values(3, (3, 5), 1.0)
    for kw in (dict(axis=0), dict(complex_mode="shared"), dict(grid="qs4d", rounding="half_up")):
        a = quantize(x, 16, **kw)
        b = quantize(x, 16, max_modulus=None, **kw)
        assert np.array_equal(a.q, b.q) and np.array_equal(a.inv_scale, b.inv_scale)
        assert np.array_equal(a.q, fake_quant_ref(x, 16, **kw)[1].astype(np.int64))


@pytest.mark.parametrize("kw", [dict(axis=0), dict(axis=1, complex_mode="shared"), dict(grid="qs4d", axis=0)])
def test_idempotent_and_per_channel_independent(kw):
    x = _disk_values(4, (4, 6), 1.0, np.complex64)
    spec = QuantSpec(8, max_modulus=1.0, **kw)
    x_hat, state = spec.forward(x)
    again, _ = spec.apply(x_hat, state.layout, state.inv, state.zp)
    assert np.array_equal(again, x_hat)
    # per channel: each channel alone, per tensor, gives the same values
    axis = kw["axis"]
    for c in range(x.shape[axis]):
        one = np.take(x, [c], axis=axis)
        alone = fake_quant(one, 8, max_modulus=1.0, **{**kw, "axis": None})
        assert np.array_equal(np.take(x_hat, [c], axis=axis), alone)


# -- the stateful quantizer and its gradients -----------------------------------
@pytest.mark.parametrize("scale_mode", ["absmax", "absmean", "fixed", "running", "learned"])
def test_quantizer_forward_and_quantize_use_the_bound(scale_mode):
    x = _disk_values(5, (4, 8), 1.0, np.complex64)
    extra = {"fixed_range": 1.0} if scale_mode == "fixed" else {}
    q = Quantizer(8, scale_mode=scale_mode, axis=0, n_scales=8, max_modulus=1.0, **extra)
    out = q.forward(x, training=True)
    t = q.quantize(x)
    assert np.array_equal(t.dequantize(), out)
    k, inv = _parts(t)
    assert (_mod2(k, inv) <= 1.0).all()
    # the same scales without the bound give the plain codes: the bound is the only difference
    state = q.last_state()
    plain = QuantSpec(8, axis=0).apply(x, state.layout, state.inv, state.zp, want_codes=True)[1].tensor()
    assert np.array_equal(t.inv_scale, plain.inv_scale)
    kp, _ = _parts(plain)
    assert (_mod2(kp, inv) > 1.0).any()  # the test exercises moved codes
    inside = _mod2(kp, inv) <= 1.0
    assert np.array_equal(t.q[:, inside], plain.q[:, inside])


@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_ste_passes_the_gradient_and_clips_where_plain_rounding_saturates(ste):
    x = _disk_values(6, (3, 5), 1.2)
    q = Quantizer(8, ste=ste, scale_mode="fixed", fixed_range=0.9, max_modulus=1.0, dtype=np.float64)
    q.forward(x, training=True)
    g = _disk_values(7, (3, 5), 1.0)
    dx = q.backward(g)
    if ste == "identity":
        assert dx is g or np.array_equal(dx, g)
        return
    inv = q.last_state().inv  # (2,): real, imaginary part
    sat_re = np.abs(round_ref(x.real * inv[0], "half_even")) > 3
    sat_im = np.abs(round_ref(x.imag * inv[1], "half_even")) > 3
    assert sat_re.any() and sat_im.any()
    assert np.array_equal(dx.real, np.where(sat_re, 0.0, g.real))
    assert np.array_equal(dx.imag, np.where(sat_im, 0.0, g.imag))


@pytest.mark.parametrize("axis, n_scales, complex_mode", [(None, 2, "cartesian"), (0, 8, "cartesian"),
                                                          (1, 3, "shared")])
def test_lsq_step_gradient_matches_fd_of_the_frozen_code_surrogate(axis, n_scales, complex_mode):
    """With the chosen (possibly moved) codes k frozen as residuals r = k - clip(v):
    x_hat(x, step) = (clip(x/step, qmin - 1/2, qmax + 1/2) + r) * step per part, as the plain
    quantizer's test; the hand-written step gradient must be its exact derivative."""
    x = _disk_values(8, (4, 3), 1.15)
    rng = np.random.default_rng(9)
    w = rng.normal(size=x.shape) + 1j * rng.normal(size=x.shape)
    q = Quantizer(8, scale_mode="learned", ste="clipped", init_range=0.95, lsq_grad_scale=False, axis=axis,
                  n_scales=n_scales, complex_mode=complex_mode, max_modulus=1.0, dtype=np.float64)
    x_hat = q.forward(x, training=True)
    dx = q.backward(w)
    state = q.last_state()
    lay, g = state.layout, state.grid
    parts = np.stack([x.real, x.imag])
    wp = np.stack([w.real, w.imag])
    inv0 = lay.broadcast(state.inv)
    k = state.tensor().q.astype(np.float64)
    v0 = np.clip(parts * inv0, g.qmin - 0.5, g.qmax + 0.5)
    r = k - v0
    plain = np.clip(round_ref(v0, "half_even"), g.qmin, g.qmax)
    assert (k != plain).any()  # some codes were moved by the bound
    step = q.params["step"].copy()

    def surrogate():
        inv = lay.broadcast(1.0 / step)
        return float(np.sum(wp * (np.clip(parts * inv, g.qmin - 0.5, g.qmax + 0.5) + r) / inv))

    assert np.isclose(surrogate(), np.sum(wp[0] * x_hat.real + wp[1] * x_hat.imag), rtol=1e-13)
    assert grad_error(q.grads["step"], numerical_grad(surrogate, step)) <= 1e-6
    sat = np.abs(parts * inv0) > g.qmax + 0.5
    assert np.array_equal(np.stack([dx.real, dx.imag]), np.where(sat, 0.0, wp))


# -- bad input ---------------------------------------------------------------------
@pytest.mark.parametrize("bad, err", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                      (float("inf"), ValueError), ("1", TypeError), (True, TypeError)])
def test_bad_max_modulus_is_named(bad, err):
    with pytest.raises(err, match="max_modulus"):
        QuantSpec(8, max_modulus=bad)
    with pytest.raises(err, match="max_modulus"):
        fake_quant(np.ones(3, dtype=np.complex64), 8, max_modulus=bad)
    with pytest.raises(err, match="max_modulus"):
        Quantizer(8, max_modulus=bad)


def test_max_modulus_on_a_real_tensor_is_refused_in_every_path():
    x = np.linspace(-1, 1, 6)
    with pytest.raises(ValueError, match=r"max_modulus=1.0 bounds complex values, but x is real"):
        fake_quant(x, 8, max_modulus=1.0)
    with pytest.raises(ValueError, match="max_modulus"):
        quantize(x, 8, max_modulus=1.0)
    q = Quantizer(8, scale_mode="learned", max_modulus=1.0, name="w")
    with pytest.raises(ValueError, match="max_modulus.*w is real"):
        q.forward(x)
    assert not q.step_ready  # refused before any state changed
    spec = QuantSpec(8, max_modulus=1.0)
    lay = QuantSpec(8).layout(x)
    with pytest.raises(ValueError, match="max_modulus"):
        spec.apply(x, lay, np.ones(1), np.zeros(1))


def test_max_modulus_is_stored_as_a_float():
    spec = QuantSpec(8, max_modulus=1)
    assert type(spec.max_modulus) is float and spec == QuantSpec(8, max_modulus=1.0)
