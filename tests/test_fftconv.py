"""The FFT convolution's Numba spectrum kernels and FFT sizes, against reference/ssm.py."""
import numpy as np
import pytest
import scipy.fft
from hypothesis import given, settings
from hypothesis import strategies as st

from qs4d_np.kernels import spectral
from qs4d_np.ssm.fftconv import causal_conv, causal_conv_backward, fft_length
from reference import ssm as ref

SETTINGS = settings(max_examples=25, deadline=None)
VARIANT = st.sampled_from(["parallel", "serial"])


def _spectra(rng, shape, dtype):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)


@st.composite
def spectrum_case(draw):
    batch, bins, channels = draw(st.integers(1, 5)), draw(st.integers(1, 9)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([np.complex64, np.complex128]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return [_spectra(rng, s, dtype) for s in ((batch, bins, channels), (batch, bins, channels), (bins, channels))]


def _bound(dtype, magnitude):
    # complex128: rounding order only. complex64: one product rounding (~1.2e-7 relative
    # for a complex product) per term, the batch sum itself runs in complex128.
    return (1e-13 if dtype == np.complex128 else 3e-7) * magnitude + 1e-300


@SETTINGS
@given(spectrum_case(), VARIANT)
def test_spectrum_product(case, variant):
    u_f, _, K_f = case
    want_y, want_conj = ref.spectrum_product(u_f, K_f)
    out = np.empty_like(u_f)
    getattr(spectral.spectrum_product, variant)(u_f, K_f, out)
    assert np.all(np.abs(out - want_y) <= _bound(u_f.dtype, np.abs(want_y)))
    np.testing.assert_array_equal(u_f, want_conj.astype(u_f.dtype))  # conjugation is exact


@SETTINGS
@given(spectrum_case(), VARIANT)
def test_spectrum_backward(case, variant):
    g_f, u_f_conj, K_f = case
    want_dK, want_g = ref.spectrum_backward(g_f, u_f_conj, K_f)
    magnitude = np.sum(np.abs(g_f.astype(np.complex128) * u_f_conj), axis=0)
    dK_f = np.empty(K_f.shape, np.complex128)
    getattr(spectral.spectrum_backward, variant)(g_f, u_f_conj, K_f, dK_f)
    assert np.all(np.abs(dK_f - want_dK) <= _bound(g_f.dtype, magnitude))
    assert np.all(np.abs(g_f - want_g) <= _bound(g_f.dtype, np.abs(want_g)))


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 20), st.integers(0, 5), st.integers(0, 2**32 - 1),
       st.sampled_from([np.float32, np.float64, np.complex64]), VARIANT)
def test_swap_axes(batch, rows, cols, extra, seed, dtype, variant):
    """out = x with axes 1 and 2 swapped, cut to out's shape (x may be longer on its last axis)."""
    x = np.random.default_rng(seed).standard_normal((batch, cols, rows + extra)).astype(dtype)
    out = np.empty((batch, rows, cols), dtype)
    getattr(spectral.swap_axes, variant)(x, out)
    np.testing.assert_array_equal(out, np.swapaxes(x, 1, 2)[:, :rows, :])


def test_spectrum_backward_independent_of_threads():
    """The batch sum runs per (bin, channel) in batch order, so threads cannot change a bit."""
    rng = np.random.default_rng(3)
    shape = (8, 100, 128)  # above PARALLEL_MIN_SIZE
    g_f, u_f_conj, K_f = _spectra(rng, shape, np.complex64), _spectra(rng, shape, np.complex64), \
        _spectra(rng, shape[1:], np.complex64)
    results = []
    for kern in (spectral.spectrum_backward.parallel, spectral.spectrum_backward.serial):
        g = g_f.copy()
        dK_f = np.empty(K_f.shape, np.complex128)
        kern(g, u_f_conj, K_f, dK_f)
        results.append((dK_f, g))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("L", [1, 2, 3, 9, 100, 784, 1024])
def test_fft_length_is_fast_and_long_enough(L):
    n = fft_length(L)
    assert n >= 2 * L - 1 and n == scipy.fft.next_fast_len(n, real=True)


@pytest.mark.parametrize("L", [5, 37, 100])
def test_float32_convolution_tracks_float64(L):
    """float32 data: FFT rounding is ~log2(n) ulp of the largest terms (|K| * |u| summed)."""
    rng = np.random.default_rng(L)
    u = rng.standard_normal((3, L, 4))
    K = rng.standard_normal((4, L)) * np.exp(-np.arange(L) / 20)
    g = rng.standard_normal(u.shape)
    y, u_f_conj, K_f = causal_conv(u.astype(np.float32), K.astype(np.float32))
    assert y.dtype == np.float32
    y_ref = ref.causal_conv_direct(u, K)
    scale = ref.causal_conv_direct(np.abs(u), np.abs(K))
    assert np.all(np.abs(y - y_ref) <= 1e-5 * scale.max())
    du, dK = causal_conv_backward(g.astype(np.float32), u_f_conj, K_f)
    y64, u64, K64 = causal_conv(u, K)
    du_ref, dK_ref = causal_conv_backward(g, u64, K64)
    assert du.dtype == np.float32 and dK.dtype == np.float64
    assert np.abs(du - du_ref).max() <= 1e-5 * np.abs(du_ref).max() + 1e-6
    assert np.abs(dK - dK_ref).max() <= 1e-5 * np.abs(dK_ref).max() + 1e-6


def test_results_do_not_alias_scratch_buffers():
    """Outputs of one call survive later calls of other shapes and dtypes (scratch is reused)."""
    rng = np.random.default_rng(5)
    cases = [(rng.standard_normal((2, L, 3)).astype(dt), rng.standard_normal((3, L)))
             for L, dt in ((7, np.float64), (7, np.float32), (12, np.float64), (7, np.float64))]
    outs = []
    for u, K in cases:
        y, u_f_conj, K_f = causal_conv(u, K)
        du, dK = causal_conv_backward(np.ones_like(u), u_f_conj, K_f)
        outs.append((y.copy(), y, du.copy(), du))
    for (u, K), (y_saved, y, du_saved, du) in zip(cases, outs):
        np.testing.assert_array_equal(y, y_saved)
        np.testing.assert_array_equal(du, du_saved)
        tol = 1e-4 if u.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(y, ref.causal_conv_direct(u, K), rtol=tol, atol=tol)
