"""Causal convolution of (batch, length, H) signals with per-channel kernels via real FFTs.

y[b, t, h] = sum_{s <= t} K[h, t - s] * u[b, s, h]

The FFT runs along axis 1 of the (batch, length, H) layout (as fast as the
last axis here, and no transposes are needed). Zero-padding to n = 2L makes
the circular convolution causal and keeps the negative lags of the
correlations in the backward away from lags 0..L-1.
"""
from __future__ import annotations

import numpy as np
import scipy.fft

FFT_WORKERS = 2


def fft_length(L: int) -> int:
    """FFT size for length-L causal convolution (2L measured as fast as next_fast_len(2L-1))."""
    return 2 * L


def causal_conv(u: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convolve u (B, L, H) with K (H, L).

    Returns y (B, L, H) (a view into the inverse FFT's (B, n, H) output) and
    the spectra conj(u_f) (B, n/2+1, H) and K_f (n/2+1, H) that
    ``causal_conv_backward`` needs. u's spectrum is conjugated in place after
    use: the backward only needs it conjugated.
    """
    L = u.shape[1]
    n = fft_length(L)
    u_f = scipy.fft.rfft(u, n=n, axis=1, workers=FFT_WORKERS)
    K_f = scipy.fft.rfft(K.T.astype(u.dtype, copy=False), n=n, axis=0, workers=FFT_WORKERS)
    y = scipy.fft.irfft(u_f * K_f, n=n, axis=1, workers=FFT_WORKERS)[:, :L]
    return y, np.conj(u_f, out=u_f), K_f


def causal_conv_backward(g: np.ndarray, u_f_conj: np.ndarray, K_f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From g = dL/dy (B, L, H) to du (B, L, H) (a view, like y) and dK (H, L).

    du[s] = sum_t g[t] K[t - s] and dK[l] = sum_{b, t} g[b, t] u[b, t - l] are
    correlations: products with conjugated spectra. dK is summed over the batch
    in the frequency domain, so it costs one small inverse FFT.
    """
    L = g.shape[1]
    n = fft_length(L)
    g_f = scipy.fft.rfft(g, n=n, axis=1, workers=FFT_WORKERS)
    dK_f = np.einsum("bfh,bfh->fh", g_f, u_f_conj)
    dK = scipy.fft.irfft(dK_f, n=n, axis=0, workers=FFT_WORKERS)[:L].T
    g_f *= np.conj(K_f)
    du = scipy.fft.irfft(g_f, n=n, axis=1, workers=FFT_WORKERS)[:, :L]
    return du, dK
