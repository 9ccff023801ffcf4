"""The quantized-state recurrent scan: bit-exact against its loop twin, FD-checked backward."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qs4d_np.quant.fake import QuantSpec
from qs4d_np.quant.scan import StateQuant, quant_scan, quant_scan_backward, state_absmax
from reference.gradcheck import grad_error, numerical_grad
from reference.quant import quant_scan_backward_ref, quant_scan_ref


def _layer(seed, B, L, H, M, dtype=np.float64):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(B, L, H)).astype(dtype)
    Abar = rng.uniform(0.6, 0.98, (H, M)) * np.exp(1j * rng.uniform(-3, 3, (H, M)))
    Bbar = 0.5 * (rng.normal(size=(H, M)) + 1j * rng.normal(size=(H, M)))
    C = rng.normal(size=(H, M)) + 1j * rng.normal(size=(H, M))
    D = rng.normal(size=H)
    return u, Abar, Bbar, C, D


def _twin_args(state, H):
    g = state.spec.code_grid if state.spec is not None else None
    return state.per_channel_inv(H, np.float64), (g.qmin if g else -1), (g.qmax if g else 1)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), L=st.integers(1, 8), H=st.integers(1, 3),
       M=st.integers(1, 4), levels=st.integers(3, 300), grid=st.sampled_from(["narrow", "qs4d", "full"]),
       rounding=st.sampled_from(["half_even", "half_up", "half_away", "floor"]), quantize=st.booleans(),
       clip=st.sampled_from([np.inf, 0.3, 1.0]), ste=st.sampled_from(["identity", "clipped"]),
       inv_kind=st.sampled_from(["scalar", "channel", "part"]))
def test_kernel_matches_loop_twin_bit_for_bit(seed, B, L, H, M, levels, grid, rounding, quantize, clip, ste, inv_kind):
    u, Abar, Bbar, C, D = _layer(seed, B, L, H, M)
    rng = np.random.default_rng(seed + 1)
    # small inv so the codes also saturate sometimes
    inv = {"scalar": rng.uniform(2, 60), "channel": rng.uniform(2, 60, H), "part": rng.uniform(2, 60, (H, 2))}[inv_kind]
    seen = []  # the forward's observed max |w| (H, 2)
    state = StateQuant(QuantSpec(levels, grid=grid, rounding=rounding) if quantize else None, inv, ste, seen.append)
    y, cache = quant_scan(u, Abar, Bbar, C, D, state, clip)
    inv2, qmin, qmax = _twin_args(state, H)
    y_want, wmax = quant_scan_ref(u, Abar, Bbar, C, D, inv2, qmin, qmax, rounding, clip, quantize, return_wmax=True)
    assert np.array_equal(y, y_want)
    assert len(seen) == 1 and np.array_equal(seen[0], wmax)
    gy = rng.normal(size=y.shape)
    got = quant_scan_backward(gy, cache)
    want = quant_scan_backward_ref(u, Abar, Bbar, C, D, inv2, qmin, qmax, gy, rounding, clip, quantize,
                                   clipped_ste=(ste == "clipped"))
    want["step"] = state.reduce_step(want["step"])
    for key in ("u", "Abar", "Bbar", "C", "D", "step"):
        assert np.array_equal(got[key], want[key]), key


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), L=st.integers(1, 8), H=st.integers(1, 3),
       M=st.integers(1, 4), quantize=st.booleans(), clip=st.sampled_from([np.inf, 0.5]))
def test_state_absmax_matches_twin_and_calibrates(seed, B, L, H, M, quantize, clip):
    u, Abar, Bbar, C, D = _layer(seed, B, L, H, M)
    state = StateQuant(QuantSpec(63) if quantize else None, np.random.default_rng(seed).uniform(5, 50, (H, 2)))
    got = state_absmax(u, Abar, Bbar, state, clip)
    inv2, qmin, qmax = _twin_args(state, H)
    _, want = quant_scan_ref(u, Abar, Bbar, C, D, inv2, qmin, qmax, clip=clip, quantize=quantize,
                             return_absmax=True)
    assert np.array_equal(got, want)
    # calibrated on float states: with that range no state code saturates
    spec = QuantSpec(255, power_of_two=True)
    float_max = state_absmax(u, Abar, Bbar, StateQuant(None), clip)
    for gran in ("tensor", "channel", "part"):
        cal = StateQuant.calibrated(spec, float_max, gran)
        inv = cal.per_channel_inv(H, np.float64)
        assert np.all(np.frexp(inv)[0] == 0.5)  # powers of two
        assert np.all(float_max * inv <= spec.code_grid.qmax + 0.5)


def test_one_step_by_hand():
    # clip to [-1, 1], then x4, round half to even, saturate to [-3, 3], then /4
    u = np.array([[[1.0], [0.0]]])
    Abar, Bbar, C, D = np.array([[0.5 + 0j]]), np.array([[1.3 - 0.7j]]), np.array([[1 + 1j]]), np.array([0.5])
    y, _ = quant_scan(u, Abar, Bbar, C, D, StateQuant(QuantSpec(7), 4.0), clip=1.0)
    # t=0: w = (1.0, -0.7) -> (4, -2.8) -> (4, -3) -> (3, -3) -> x = (0.75, -0.75);
    #      y = 2*(0.75*1 - 1*(-0.75)) + 0.5 = 3.5
    # t=1: v = 0.5*x = (0.375, -0.375) -> (1.5, -1.5) -> ties to even (2, -2) -> x = (0.5, -0.5); y = 2.0
    assert np.array_equal(y.ravel(), [3.5, 2.0])


def _fd_check(u, Abar, Bbar, C, D, state, clip, gy, forward):
    """Gradients of sum(gy * y) from the backward vs central differences of ``forward``."""
    _, cache = quant_scan(u, Abar, Bbar, C, D, state, clip)
    got = quant_scan_backward(gy, cache)
    for key, arr in (("u", u), ("Abar", Abar), ("Bbar", Bbar), ("C", C), ("D", D)):
        num = numerical_grad(lambda: float(np.sum(gy * forward())), arr)
        assert grad_error(got[key], num) <= 1e-6, key
    return got


@pytest.mark.parametrize("clip", [np.inf, 0.8])
def test_backward_matches_fd_without_state_quantization(clip):
    # quantizer off: the scan is smooth except at the clip, whose gradient is 0 where active
    u, Abar, Bbar, C, D = _layer(5, 2, 9, 2, 3)
    gy = np.random.default_rng(6).normal(size=u.shape)
    state = StateQuant(None)
    forward = lambda: quant_scan(u, Abar, Bbar, C, D, state, clip)[0]  # noqa: E731
    got = _fd_check(u, Abar, Bbar, C, D, state, clip, gy, forward)
    assert np.all(got["step"] == 0)
    if np.isfinite(clip):  # the clip really was active somewhere
        plain = quant_scan(u, Abar, Bbar, C, D, state)[0]
        assert not np.allclose(plain, forward())


@pytest.mark.parametrize("inv_kind", ["scalar", "part"])
def test_clipped_ste_and_state_step_match_fd_of_the_lsq_surrogate(inv_kind):
    u, Abar, Bbar, C, D = _layer(7, 2, 8, 2, 3)
    H = 2
    rng = np.random.default_rng(8)
    step = np.array(0.11) if inv_kind == "scalar" else rng.uniform(0.08, 0.15, (H, 2))
    spec = QuantSpec(15)  # codes -7..7: with steps ~0.1 states beyond ~0.75 saturate
    state = StateQuant(spec, 1.0 / step, ste="clipped")
    clip = 1.5
    gy = rng.normal(size=u.shape)
    frozen = {}

    def surrogate():
        inv = StateQuant(spec, 1.0 / step).per_channel_inv(H, np.float64)
        return quant_scan_ref(u, Abar, Bbar, C, D, inv, -7, 7, clip=clip, frozen=frozen)

    y, _ = quant_scan(u, Abar, Bbar, C, D, state, clip)
    assert np.array_equal(surrogate(), y)  # records the residuals at this point
    got = _fd_check(u, Abar, Bbar, C, D, state, clip, gy, surrogate)
    num = numerical_grad(lambda: float(np.sum(gy * surrogate())), step)
    assert grad_error(got["step"], num) <= 1e-6
    # the state did saturate (residual exactly -+1/2 at the surrogate's edge; exact ties
    # are measure-zero), otherwise the clipped STE would not have been exercised
    assert sum(abs(r) == 0.5 for r in frozen.values()) > 0


def test_unquantized_scan_equals_the_convolution():
    u, Abar, Bbar, C, D = _layer(9, 2, 12, 3, 4)
    y, _ = quant_scan(u, Abar, Bbar, C, D, StateQuant(None))
    L = u.shape[1]
    K = 2 * np.real(np.einsum("hn,hnl->hl", C * Bbar, Abar[:, :, None] ** np.arange(L)))
    conv = np.array([[np.convolve(u[b, :, h], K[h])[:L] for h in range(3)] for b in range(2)]).transpose(0, 2, 1)
    # float64 recurrence vs direct convolution: agreement to rounding of O(L) terms of size ~1
    np.testing.assert_allclose(y, conv + D * u, rtol=0, atol=1e-12)


def test_fine_state_quantization_approaches_float_and_float32_runs():
    u, Abar, Bbar, C, D = _layer(10, 2, 16, 3, 4)
    ref = quant_scan(u, Abar, Bbar, C, D, StateQuant(None))[0]
    fine = quant_scan(u, Abar, Bbar, C, D, StateQuant(QuantSpec(2**40), 2.0**30))[0]
    # state error <= 2**-31 per step, propagated through |Abar| < 1 and summed over <= 16 steps
    np.testing.assert_allclose(fine, ref, rtol=0, atol=1e-7)
    y32 = quant_scan(u.astype(np.float32), Abar, Bbar, C, D, StateQuant(None))[0]
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, ref, rtol=0, atol=2e-5)  # float32 state over 16 steps, |y| ~ 10


def test_bad_input():
    u, Abar, Bbar, C, D = _layer(11, 1, 4, 2, 3)
    ok = StateQuant(QuantSpec(16), 8.0)
    with pytest.raises(ValueError, match="u must have shape \\(batch, length, 2\\)"):
        quant_scan(u[:, :, :1], Abar, Bbar, C, D, ok)
    with pytest.raises(ValueError, match="Bbar must have shape \\(2, 3\\)"):
        quant_scan(u, Abar, Bbar[:, :2], C, D, ok)
    with pytest.raises(ValueError, match="u contains 1 non-finite"):
        bad = u.copy()
        bad[0, 1, 0] = np.nan
        quant_scan(bad, Abar, Bbar, C, D, ok)
    with pytest.raises(ValueError, match="inv must be a scalar, shape \\(2,\\) or \\(2, 2\\)"):
        quant_scan(u, Abar, Bbar, C, D, StateQuant(QuantSpec(16), np.ones(3)))
    with pytest.raises(ValueError, match="must be finite and > 0"):
        StateQuant(QuantSpec(16), -1.0)
    with pytest.raises(ValueError, match="state quantizer must be symmetric"):
        StateQuant(QuantSpec(16, symmetric=False), 1.0)
    with pytest.raises(ValueError, match="clip must be > 0"):
        quant_scan(u, Abar, Bbar, C, D, ok, clip=0.0)
    with pytest.raises(TypeError, match="state must be a StateQuant"):
        quant_scan(u, Abar, Bbar, C, D, 8.0)
    with pytest.raises(ValueError, match="granularity must be one of"):
        StateQuant.calibrated(QuantSpec(16), np.ones((2, 2)), "head")
    with pytest.raises(ValueError, match="absmax must have shape \\(\\*, 2\\)"):
        StateQuant.calibrated(QuantSpec(16), np.ones((2, 3)))
    _, cache = quant_scan(u, Abar, Bbar, C, D, ok)
    with pytest.raises(ValueError, match="gy must have the forward output's shape"):
        quant_scan_backward(np.ones((1, 3, 2)), cache)


def _round_shift_half_even(v: int, sh: int) -> int:
    """round(v / 2**sh) with ties to even, in integers (arithmetic shift = floor)."""
    if sh <= 0:
        return v << -sh
    q = v >> sh
    rem = v - (q << sh)
    half = 1 << (sh - 1)
    return q + 1 if rem > half or (rem == half and q & 1) else q


def _golden_case(seed, L, M, state_bits, clip_code):
    """An integer-only model of the quantized-state scan with power-of-two steps 2**-k.

    Returns (y from the integer model, y from quant_scan, event counts). Small step
    exponents make ties, saturation and clipping frequent."""
    rng = np.random.default_rng(seed)
    ka, kb, kc, kd, ku, kx = 3, 2, 5, 4, 2, int(rng.integers(2, 7))
    A = rng.integers(-5, 6, (M, 2))  # |Abar| <= 5*sqrt(2)/8 < 1
    Bq = rng.integers(-7, 8, (M, 2))
    Cq = rng.integers(-31, 32, (M, 2))
    Dq = int(rng.integers(-15, 16))
    U = rng.integers(-12, 13, L)
    qmax = 2 ** (state_bits - 1) - 1  # narrow grid of 2**state_bits levels
    E = ka + kx  # v = Abar x + Bbar u lives on the grid 2**-E (kb + ku <= ka + kx)
    events = {"tie": 0, "saturated": 0, "clipped": 0}
    x = [[0, 0] for _ in range(M)]
    y_int = []  # y * 2**(kc + kx + kd + ku), exact integers
    for t in range(L):
        acc = 0
        for n in range(M):
            ar, ai = int(A[n, 0]), int(A[n, 1])
            bu = [int(Bq[n, p]) * int(U[t]) * 2 ** (E - kb - ku) for p in (0, 1)]
            v = ((ar * x[n][0] - ai * x[n][1]) + bu[0], (ar * x[n][1] + ai * x[n][0]) + bu[1])
            for part in (0, 1):
                w = min(max(v[part], -clip_code), clip_code)            # 2. clip
                q = _round_shift_half_even(w, E - kx)                   # 3. * inv, round
                x[n][part] = min(max(q, -qmax), qmax)                   #    saturate
                events["clipped"] += w != v[part]
                events["tie"] += (w % 2 ** (E - kx)) == 2 ** (E - kx - 1)
                events["saturated"] += x[n][part] != q
            acc += int(Cq[n, 0]) * x[n][0] - int(Cq[n, 1]) * x[n][1]   # 4. read-out
        y_int.append(2 * acc * 2 ** (kd + ku) + Dq * int(U[t]) * 2 ** (kc + kx))
    y_golden = np.array(y_int, dtype=np.float64) * 2.0 ** -(kc + kx + kd + ku)

    c = lambda codes, k: (codes[:, 0] + 1j * codes[:, 1])[None, :] * 2.0**-k  # noqa: E731
    u = (U * 2.0**-ku).reshape(1, L, 1)
    y, _ = quant_scan(u, c(A, ka), c(Bq, kb), c(Cq, kc), np.array([Dq * 2.0**-kd]),
                      StateQuant(QuantSpec(2**state_bits), 2.0**kx), clip_code * 2.0**-E)
    return y_golden, y.ravel(), events


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), L=st.integers(1, 12), M=st.integers(1, 3), state_bits=st.integers(3, 10),
       clip_code=st.integers(1, 300))
def test_integer_golden_recurrence_reproduces_the_scan_bit_for_bit(seed, L, M, state_bits, clip_code):
    """With power-of-two scales every product and sum of the float64 scan is exact, so an
    integer-only model (codes, shifts, ties-to-even, saturation) must give the same y:
    the order documented in kernels.quant_scan is the one a golden model can implement."""
    y_golden, y, _ = _golden_case(seed, L, M, state_bits, clip_code)
    assert np.array_equal(y, y_golden)


def test_integer_golden_recurrence_long_run_exercises_ties_saturation_and_clip():
    y_golden, y, events = _golden_case(0, 300, 3, 5, 150)
    assert np.array_equal(y, y_golden)
    assert min(events.values()) >= 5, events


def test_results_do_not_depend_on_the_thread_count():
    import numba

    from qs4d_np.quant.fake import QuantSpec as Spec
    from qs4d_np.quant.fake import ste_backward

    rng = np.random.default_rng(13)
    x = rng.normal(size=(40, 30, 33)).astype(np.float32)  # > CHUNK: several blocks
    u, Abar, Bbar, C, D = _layer(14, 3, 20, 4, 3, np.float32)
    seen = []
    state = StateQuant(QuantSpec(255), 40.0, observer=seen.append)

    def run():
        spec = Spec(31, axis=-1)
        x_hat, st_ = spec.forward(x, scale_mode="absmean")
        _, dstep = ste_backward(x, x, st_, "clipped", want_step=True)
        y, cache = quant_scan(u, Abar, Bbar, C, D, state, 2.0)
        return [x_hat, dstep, y, seen[-1], *quant_scan_backward(y, cache).values()]

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = run()
    finally:
        numba.set_num_threads(before)
    assert all(np.array_equal(a, b) for a, b in zip(one, many))


def _gamma(k, eps):
    """Higham's gamma_k = k*eps / (1 - k*eps): the relative error bound of k roundings."""
    return k * eps / (1 - k * eps)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), L=st.integers(1, 12), H=st.integers(1, 2),
       M=st.integers(1, 3), state_bits=st.integers(3, 8), clip_code=st.sampled_from([None, 40, 150]),
       rounding=st.sampled_from(["half_even", "half_up", "half_away", "floor"]),
       ste=st.sampled_from(["identity", "clipped"]))
def test_float32_backward_within_its_rounding_bound_of_the_float64_twin(seed, B, L, H, M, state_bits, clip_code,
                                                                       rounding, ste):
    # Dyadic parameters, input and power-of-two state steps (as in _golden_case): the float32
    # forward is exact, so its states, masks and step factors equal the float64 twin's and only
    # the backward's float32 arithmetic differs. Every output is a sum of products over an
    # evaluation tree of rounding depth <= k (per step the adjoint takes 5 roundings: c*g2 and
    # its add, the STE factor, and the two-term complex update; then <= 2 for a term, L for a
    # sequence's sum, L*M for the step's, M + 2 for du_t; 1 for the final cast), so
    # |got - exact| <= gamma_k(2**-24) * sum|terms| with k = L*M + 6L + M + 4 (Higham, sec. 3.1);
    # the float64 totals over B sequences and the twin itself add gamma_{k+B}(2**-53) * sum|terms|.
    # sum|terms| is the twin's ``magnitudes`` run.
    rng = np.random.default_rng(seed)
    ka, kb, kc, kd, ku, kx = 3, 2, 5, 4, 2, int(rng.integers(2, 7))

    def codes(lo, hi, k):
        return (rng.integers(lo, hi + 1, (H, M)) + 1j * rng.integers(lo, hi + 1, (H, M))) * 2.0**-k

    Abar, Bbar, C = codes(-5, 5, ka), codes(-7, 7, kb), codes(-31, 31, kc)  # |Abar| <= 5*sqrt(2)/8 < 1
    D = rng.integers(-15, 16, H) * 2.0**-kd
    u = (rng.integers(-12, 13, (B, L, H)) * 2.0**-ku).astype(np.float32)
    clip = np.inf if clip_code is None else clip_code * 2.0 ** -(ka + kx)
    state = StateQuant(QuantSpec(2**state_bits, rounding=rounding), np.full((H, 2), 2.0**kx), ste)
    y, cache = quant_scan(u, Abar, Bbar, C, D, state, clip)
    inv, qmin, qmax = _twin_args(state, H)
    twin = dict(u=u.astype(np.float64), Abar=Abar, Bbar=Bbar, C=C, D=D, inv=inv, qmin=qmin, qmax=qmax,
                rounding=rounding, clip=clip)
    assert np.array_equal(y, quant_scan_ref(**twin).astype(np.float32))  # the forward is exact
    gy = rng.normal(size=u.shape).astype(np.float32)
    got = quant_scan_backward(gy, cache)
    kw = dict(gy=gy.astype(np.float64), clipped_ste=ste == "clipped")
    want = quant_scan_backward_ref(**twin, **kw)
    mag = quant_scan_backward_ref(**twin, **kw, magnitudes=True)
    k = L * M + 6 * L + M + 4
    tol = _gamma(k, 2.0**-24) + _gamma(k + B, 2.0**-53)
    assert got["u"].dtype == np.float32 and got["Abar"].dtype == np.complex64
    for key in ("u", "Abar", "Bbar", "C", "D", "step"):
        for part in (np.real, np.imag):
            err = np.abs(part(got[key]).astype(np.float64) - part(want[key]))
            assert np.all(err <= tol * part(mag[key])), key
