"""Causal convolution of (batch, length, H) signals with per-channel kernels via real FFTs.

y[b, t, h] = sum_{s <= t} K[h, t - s] * u[b, s, h]

The FFT runs along axis 1 of the (batch, length, H) layout (no transposes
are needed). Zero-padding to n >= 2L - 1 makes the circular convolution
causal and keeps the negative lags of the correlations in the backward away
from lags 0..L-1; n is the next size with small prime factors (for L = 784,
n = 1600 = 2^6 * 5^2 is ~20% faster per transform than 2L = 1568 = 2^5 * 7^2).
The products and the batch reduction in the frequency domain are fused Numba
passes (``kernels.spectral``).
"""
from __future__ import annotations

import numpy as np
import scipy.fft

from qs4d_np.kernels.matmul import n_workers
from qs4d_np.kernels.spectral import spectrum_backward, spectrum_product


def fft_length(L: int) -> int:
    """FFT size for a length-L causal convolution: the smallest fast size >= 2L - 1."""
    return scipy.fft.next_fast_len(2 * L - 1, real=True)


def causal_conv(u: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convolve u (B, L, H) with K (H, L).

    Returns y (B, L, H) (a view into the inverse FFT's (B, n, H) output) and
    the spectra conj(u_f) (B, n/2+1, H) and K_f (n/2+1, H) that
    ``causal_conv_backward`` needs. u's spectrum is conjugated in place after
    use: the backward only needs it conjugated.
    """
    L = u.shape[1]
    n = fft_length(L)
    workers = n_workers()
    u_f = scipy.fft.rfft(u, n=n, axis=1, workers=workers)
    K_f = scipy.fft.rfft(K.T.astype(u.dtype, copy=False), n=n, axis=0, workers=workers)
    y_f = np.empty_like(u_f)
    spectrum_product(u_f, K_f, y_f)
    y = scipy.fft.irfft(y_f, n=n, axis=1, workers=workers, overwrite_x=True)[:, :L]
    return y, u_f, K_f


def causal_conv_backward(g: np.ndarray, u_f_conj: np.ndarray, K_f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From g = dL/dy (B, L, H) to du (B, L, H) (a view, like y) and dK (H, L) float64.

    du[s] = sum_t g[t] K[t - s] and dK[l] = sum_{b, t} g[b, t] u[b, t - l] are
    correlations: products with conjugated spectra. dK is summed over the batch
    in the frequency domain (in complex128), so it costs one small inverse FFT.
    """
    L = g.shape[1]
    n = fft_length(L)
    workers = n_workers()
    g_f = scipy.fft.rfft(g, n=n, axis=1, workers=workers)
    dK_f = np.empty(K_f.shape, dtype=np.complex128)
    spectrum_backward(g_f, u_f_conj, K_f, dK_f)
    dK = scipy.fft.irfft(dK_f, n=n, axis=0, workers=workers, overwrite_x=True)[:L].T
    du = scipy.fft.irfft(g_f, n=n, axis=1, workers=workers, overwrite_x=True)[:, :L]
    return du, dK
