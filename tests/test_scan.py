"""The Numba recurrent scan and its adjoint against the float64 loop twins in reference/ssm.py."""
import numba
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qs4d_np.ssm.scan import scan, scan_backward
from qs4d_np.ssm.discretize import discretize
from qs4d_np.ssm.s4d import INITS, init_A
from reference.ssm import scan_backward_naive, scan_naive


def problem(seed, batch, L, H, M, log_dt_range, init, disc):
    rng = np.random.default_rng(seed)
    log_A_real, A_imag = init_A(init, H, 2 * M)
    log_dt = rng.uniform(*log_dt_range, H)
    B = rng.standard_normal((H, M)) + 1j * rng.standard_normal((H, M))
    d = discretize(log_dt, log_A_real, A_imag, B, disc)
    C = rng.standard_normal((H, M)) + 1j * rng.standard_normal((H, M))
    D = rng.standard_normal(H)
    u = rng.standard_normal((batch, L, H))
    dy = rng.standard_normal((batch, L, H))
    return u, dy, d.Abar, d.Bbar, C, D


def rel(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 3), L=st.integers(1, 300),
       H=st.integers(1, 4), M=st.integers(1, 8),
       log_dt_range=st.sampled_from([(np.log(1e-3), np.log(1e-1)), (np.log(1e-1), np.log(1.0))]),
       init=st.sampled_from(INITS), disc=st.sampled_from(["zoh", "bilinear"]),
       dtype=st.sampled_from([np.float64, np.float32]))
@example(seed=4630, batch=2, L=250, H=2, M=1, log_dt_range=(np.log(1e-3), np.log(1e-1)), init="lin", disc="zoh",
         dtype=np.float32)  # gA cancels to ~1e-3 of its terms' magnitude
def test_scan_matches_reference(seed, batch, L, H, M, log_dt_range, init, disc, dtype):
    u, dy, Abar, Bbar, C, D = problem(seed, batch, L, H, M, log_dt_range, init, disc)
    y_ref, _ = scan_naive(u, Abar, Bbar, C, D)
    du_ref, gA_ref, gB_ref, gC_ref, _ = scan_backward_naive(u, dy, Abar, Bbar, C, D)
    u_k, dy_k = u.astype(dtype), dy.astype(dtype)
    y = scan(u_k, Abar, Bbar, C, D)
    assert y.dtype == dtype and y.shape == u.shape
    du, gA, gB, gC = scan_backward(u_k, dy_k, Abar, Bbar, C, D)
    assert du.dtype == dtype and gA.shape == (H, M)
    pairs = ((y, y_ref), (du, du_ref), (gA, gA_ref), (gB, gB_ref), (gC, gC_ref))
    if dtype == np.float64:
        # differs from the twin by summation order only (measured <= 1e-14)
        for got, want in pairs:
            assert rel(got, want) <= 1e-12
        return
    # float32: each output is a long sum of products, so its rounding error scales
    # with the sum of the terms' magnitudes, not with the (possibly cancelled)
    # result. The twin run on |inputs| gives that magnitude; float32 error against
    # it measured <= 1.7e-7 (~1.4 eps32) on 60 cases incl. a cancelling one that a
    # result-relative bound fails (seed 4630); 1e-6 leaves ~6x margin.
    y_abs, _ = scan_naive(*(np.abs(a) for a in (u, Abar, Bbar, C, D)))
    abs_bounds = (y_abs, *scan_backward_naive(*(np.abs(a) for a in (u, dy, Abar, Bbar, C, D)))[:4])
    for (got, want), bound in zip(pairs, abs_bounds):
        assert np.max(np.abs(got - want)) <= 1e-6 * max(np.max(np.abs(bound)), 1e-300)


def test_scan_bad_arguments():
    u = np.zeros((1, 4, 2))
    Abar = np.zeros((2, 3), dtype=complex)
    with pytest.raises(ValueError, match=r"Abar must have shape \(2, \*\), got \(3, 3\)"):
        scan(u, np.zeros((3, 3), dtype=complex), Abar, Abar, np.zeros(2))
    with pytest.raises(ValueError, match=r"Bbar must have shape \(2, 3\), got \(2, 2\)"):
        scan(u, Abar, np.zeros((2, 2), dtype=complex), Abar, np.zeros(2))
    with pytest.raises(ValueError, match=r"C must have shape \(2, 3\), got \(3,\)"):
        scan(u, Abar, Abar, np.zeros(3, dtype=complex), np.zeros(2))
    with pytest.raises(ValueError, match=r"D must have shape \(2,\), got \(3,\)"):
        scan(u, Abar, Abar, Abar, np.zeros(3))
    with pytest.raises(ValueError, match="u must be a float32/float64 array"):
        scan(np.zeros((4, 2)), Abar, Abar, Abar, np.zeros(2))
    with pytest.raises(TypeError, match="u must be real"):
        scan(u + 0j, Abar, Abar, Abar, np.zeros(2))
    with pytest.raises(ValueError, match=r"dy must have u's shape"):
        scan_backward(u, np.zeros((1, 3, 2)), Abar, Abar, Abar, np.zeros(2))
    # used to fail deep inside with AttributeError: 'list' object has no attribute 'shape'
    with pytest.raises(TypeError, match="D must be a numpy array, got list"):
        scan(u, Abar, Abar, Abar, [0.0, 0.0])
    with pytest.raises(TypeError, match="D must be real"):
        scan(u, Abar, Abar, Abar, np.zeros(2, dtype=complex))
    # the small parameters are checked for NaN/inf; u is left to S4D.forward (see scan's docstring)
    bad = Abar.copy()
    bad[1, 2] = np.nan
    for args, name in (((bad, Abar, Abar, np.zeros(2)), "Abar"), ((Abar, bad, Abar, np.zeros(2)), "Bbar"),
                       ((Abar, Abar, bad, np.zeros(2)), "C"), ((Abar, Abar, Abar, np.array([0.0, np.inf])), "D")):
        with pytest.raises(ValueError, match=f"{name} contains 1 non-finite"):
            scan(u, *args)
        with pytest.raises(ValueError, match=f"{name} contains 1 non-finite"):
            scan_backward(u, u, *args)


def test_scan_is_deterministic_across_thread_counts():
    # each (batch, channel) sequence runs on one thread in a fixed order, so
    # the split over threads must not change a single bit
    u, dy, Abar, Bbar, C, D = problem(3, 3, 40, 3, 4, (np.log(1e-3), np.log(1e-1)), "lin", "zoh")
    u, dy = u.astype(np.float32), dy.astype(np.float32)
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has a single thread here: nothing to compare")
    before = numba.get_num_threads()
    results = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        try:
            results.append((scan(u, Abar, Bbar, C, D), *scan_backward(u, dy, Abar, Bbar, C, D)))
        finally:
            numba.set_num_threads(before)
    for a, b in zip(results[0], results[-1]):
        assert np.array_equal(a, b)
