"""S4D building blocks: discretization, Vandermonde kernel, FFT convolution (float64)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qs4d_np.kernels import vandermonde as vd
from qs4d_np.ssm.discretize import continuous_A, discretize
from qs4d_np.ssm.fftconv import causal_conv, causal_conv_backward
from qs4d_np.ssm.kernel import ssm_kernel, ssm_kernel_backward, vandermonde_adjoint
from reference.gradcheck import grad_error, numerical_grad
from reference.ssm import causal_conv_direct, kernel_explicit, vandermonde_adjoint_explicit, zoh_expm


def random_ssm(rng, H, M, dt_range=(1e-3, 1e-1)):
    log_dt = rng.uniform(np.log(dt_range[0]), np.log(dt_range[1]), H)
    log_A_real = rng.uniform(-2, 1, (H, M))
    A_imag = rng.uniform(-10, 10, (H, M))
    B = rng.standard_normal((H, M)) + 1j * rng.standard_normal((H, M))
    return log_dt, log_A_real, A_imag, B


def test_zoh_matches_augmented_matrix_exponential():
    rng = np.random.default_rng(0)
    log_dt, log_A_real, A_imag, B = random_ssm(rng, 3, 4, dt_range=(1e-3, 1.0))
    d = discretize(log_dt, log_A_real, A_imag, B, "zoh")
    Abar, Bbar = zoh_expm(np.exp(log_dt), continuous_A(log_A_real, A_imag), B)
    np.testing.assert_allclose(d.Abar, Abar, rtol=1e-12)
    np.testing.assert_allclose(d.Bbar, Bbar, rtol=1e-10)


def test_bilinear_is_second_order_accurate():
    # bilinear and ZOH agree to O(dt^3) in Abar: halving dt divides the gap by ~8
    rng = np.random.default_rng(1)
    _, log_A_real, A_imag, _ = random_ssm(rng, 1, 5)
    gaps = []
    for dt in (1e-2, 5e-3):
        log_dt = np.array([np.log(dt)])
        z = discretize(log_dt, log_A_real, A_imag, None, "zoh")
        b = discretize(log_dt, log_A_real, A_imag, None, "bilinear")
        gaps.append(np.max(np.abs(z.Abar - b.Abar)))
    assert 7.0 < gaps[0] / gaps[1] < 9.0



@pytest.mark.parametrize("L", [1, 2, 5, 37, 100])
def test_kernel_matches_explicit_powers(L):
    rng = np.random.default_rng(L)
    H, M = 2, 3
    Abar = 0.97 * np.exp(1j * rng.uniform(-np.pi, np.pi, (H, M)))
    Abar[0, 0] = 0.0  # bilinear at dt*A = -2: no logarithms may appear
    C = rng.standard_normal((H, M)) + 1j * rng.standard_normal((H, M))
    Bbar = rng.standard_normal((H, M)) + 1j * rng.standard_normal((H, M))
    K = ssm_kernel(C * Bbar, Abar, L)
    np.testing.assert_allclose(K, kernel_explicit(C, Bbar, Abar, L), rtol=1e-12, atol=1e-12)
    G = rng.standard_normal((H, L))
    V, dV = vandermonde_adjoint(G, Abar)
    V_explicit, dV_explicit = vandermonde_adjoint_explicit(G, Abar)
    np.testing.assert_allclose(V, V_explicit, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dV, dV_explicit, rtol=1e-12, atol=1e-11)  # l*G_l terms: up to L times larger


def test_kernel_argument_checks():
    Ct = np.ones((2, 3), dtype=complex)
    Abar = np.full((2, 3), 0.5 + 0j)
    with pytest.raises(ValueError, match="L must be >= 1, got 0"):  # was: isqrt() argument must be nonnegative
        ssm_kernel(Ct, Abar, 0)
    with pytest.raises(TypeError, match="L must be an integer, got 4.0"):
        ssm_kernel(Ct, Abar, 4.0)
    with pytest.raises(ValueError, match=r"Ct must have shape \(2, 3\), got \(1, 3\)"):
        ssm_kernel(Ct[:1], Abar, 4)
    with pytest.raises(ValueError, match=r"Abar must have 2 dimensions, got shape \(3,\)"):
        ssm_kernel(Ct, Abar[0], 4)
    with pytest.raises(ValueError, match="Abar contains 1 non-finite"):
        ssm_kernel(Ct, np.array([[np.nan, 0.5, 0.5], [0.5, 0.5, 0.5]], dtype=complex), 4)
    assert ssm_kernel(Ct, Abar, np.int64(3)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"G must have shape \(2, \*\), got \(3, 5\)"):
        ssm_kernel_backward(np.zeros((3, 5)), Ct, Abar)
    with pytest.raises(ValueError, match=r"Ct must have shape \(2, 3\), got \(2, 2\)"):
        ssm_kernel_backward(np.zeros((2, 5)), Ct[:, :2], Abar)
    with pytest.raises(ValueError, match="G contains 1 non-finite"):
        ssm_kernel_backward(np.array([[0.0, np.inf], [0.0, 0.0]]), Ct, Abar)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 120), st.integers(0, 2**32 - 1),
       st.sampled_from(["parallel", "serial"]))
def test_vandermonde_kernels(H, M, L, seed, variant):
    """Numba kernels vs explicit powers. Both round each power (~L ulp relative); the bound is
    1e-13 * L times the sum of the terms' magnitudes."""
    rng = np.random.default_rng(seed)
    Abar = rng.uniform(0, 1, (H, M)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (H, M)))
    Ct = rng.standard_normal((H, M)) + 1j * rng.standard_normal((H, M))
    G = rng.standard_normal((H, L))
    K = np.empty((H, L))
    getattr(vd.kernel_from_modes, variant)(K, Ct, Abar)
    powers = np.abs(Abar)[..., None] ** np.arange(L)  # (H, M, L)
    scale = 2 * np.einsum("hm,hml->hl", np.abs(Ct), powers)
    assert np.all(np.abs(K - kernel_explicit(Ct, np.ones_like(Ct), Abar, L)) <= 1e-13 * L * scale + 1e-300)
    V, dV = np.empty_like(Abar), np.empty_like(Abar)
    getattr(vd.adjoint_sums, variant)(G, Abar, V, dV)
    V_ref, dV_ref = vandermonde_adjoint_explicit(G, Abar)
    scale_V = np.einsum("hl,hml->hm", np.abs(G), powers)
    scale_dV = np.einsum("hl,hml->hm", np.abs(G) * np.arange(L), np.abs(Abar)[..., None] ** np.maximum(np.arange(L) - 1, 0))
    assert np.all(np.abs(V - V_ref) <= 1e-13 * L * scale_V + 1e-300)
    assert np.all(np.abs(dV - dV_ref) <= 1e-13 * L * scale_dV + 1e-300)


@pytest.mark.parametrize("L", [1, 3, 40])
def test_kernel_gradients(L):
    rng = np.random.default_rng(7)
    H, M = 2, 3
    Abar = 0.9 * np.exp(1j * rng.uniform(-np.pi, np.pi, (H, M)))
    Ct = rng.standard_normal((H, M)) + 1j * rng.standard_normal((H, M))
    G = rng.standard_normal((H, L))
    loss = lambda: float(np.sum(G * ssm_kernel(Ct, Abar, L)))
    g_Ct, g_Abar = ssm_kernel_backward(G, Ct, Abar)
    assert grad_error(g_Ct, numerical_grad(loss, Ct)) <= 1e-6
    assert grad_error(g_Abar, numerical_grad(loss, Abar)) <= 1e-6


@pytest.mark.parametrize("L", [1, 2, 9])
def test_fft_convolution_matches_direct_and_gradients(L):
    rng = np.random.default_rng(L)
    u = rng.standard_normal((2, L, 3))
    K = rng.standard_normal((3, L))
    y, u_f_conj, K_f = causal_conv(u, K)
    np.testing.assert_allclose(y, causal_conv_direct(u, K), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(y.shape)
    du, dK = causal_conv_backward(g, u_f_conj, K_f)
    loss = lambda: float(np.sum(g * causal_conv(u, K)[0]))
    assert grad_error(du, numerical_grad(loss, u)) <= 1e-6
    assert grad_error(dK, numerical_grad(loss, K)) <= 1e-6
