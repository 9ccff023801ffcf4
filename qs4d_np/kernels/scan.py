"""The S4D recurrence as a Numba scan, and its reverse-time (adjoint) backward.

Per channel h, with M complex modes (state x_t of shape (M,), x_{-1} = 0):

    x_t = Abar * x_{t-1} + Bbar * u_t
    y_t = 2*Re(sum_n C_n x_{t,n}) + D*u_t

Backward (gradients in the g_z = dL/dRe(z) + i*dL/dIm(z) convention). The
adjoint lam_t = g_{x_t} obeys, with lam_L = 0,

    lam_t   = 2*dy_t*conj(C) + conj(Abar)*lam_{t+1}
    du_t    = sum_n Re(conj(Bbar_n)*lam_{t,n}) + D*dy_t
    g_Abar  = sum_t conj(x_{t-1})*lam_t
    g_Bbar  = sum_t u_t*lam_t
    g_C     = 2*sum_t dy_t*conj(x_t)

Layout and memory. Every (batch, channel) sequence is independent, so the
kernels split the batch*H sequences over the threads. Complex numbers are
stored as separate real and imaginary arrays with the mode index innermost, so
the loops over modes vectorise. The forward keeps nothing; the backward
recomputes one sequence's states into a thread-local (L+1, M) buffer pair
(~200 KB in float32 at L = 784, M = 32, so it stays in L2), summing g_C on the
way, then runs the reverse sweep. The adjoint step is the forward step with
conj(Abar) and the input conj(C)*2*dy_t, so both use ``_advance``. Sums over
modes and accumulations into arrays sit in separate loops: with both in one
loop (whose sum needs reassociation) the backward measured ~2x slower.

These are the raw kernels: the arguments are not checked, and ``n_threads``
(usually ``numba.get_num_threads()``) sets how many workers share the
sequences. ``qs4d_np.ssm.scan`` holds the checked entry points (``scan``,
``scan_backward``): they check the arrays and pass each complex parameter as
its real and imaginary parts.

``fastmath={"reassoc"}`` lets LLVM reorder floating-point sums, which it needs
to vectorise the sums over modes (y_t and du_t); it changes results by
rounding only. A bit-exact kernel (e.g. a golden model) must not use it.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

_FLAGS = dict(parallel=True, cache=True, fastmath={"reassoc"})


@njit(cache=True, inline="always")
def _advance(x_re, x_im, a_r, a_i, b_r, b_i, u_t):
    """One step x <- Abar*x + Bbar*u_t of one channel's modes, in place."""
    for n in range(x_re.shape[0]):
        xr = a_r[n] * x_re[n] - a_i[n] * x_im[n] + b_r[n] * u_t
        x_im[n] = a_r[n] * x_im[n] + a_i[n] * x_re[n] + b_i[n] * u_t
        x_re[n] = xr


@njit(**_FLAGS)
def scan_forward(u, A_re, A_im, B_re, B_im, C_re, C_im, D, n_threads):
    """y (batch, L, H) from u (batch, L, H) and the (H, M) real/imag parameter parts."""
    batch, L, H = u.shape
    M = A_re.shape[1]
    y = np.empty_like(u)
    n_seq = batch * H
    n_workers = min(n_threads, n_seq)
    zero = u.dtype.type(0)
    for w in prange(n_workers):
        x_re = np.empty(M, dtype=u.dtype)
        x_im = np.empty(M, dtype=u.dtype)
        for s in range(w, n_seq, n_workers):
            b, h = divmod(s, H)
            a_r, a_i, b_r, b_i, c_r, c_i = A_re[h], A_im[h], B_re[h], B_im[h], C_re[h], C_im[h]
            x_re[:] = 0
            x_im[:] = 0
            for t in range(L):
                u_t = u[b, t, h]
                _advance(x_re, x_im, a_r, a_i, b_r, b_i, u_t)
                acc = zero
                for n in range(M):
                    acc += c_r[n] * x_re[n] - c_i[n] * x_im[n]
                y[b, t, h] = 2 * acc + D[h] * u_t
    return y


@njit(**_FLAGS)
def scan_backward(u, dy, A_re, A_im, B_re, B_im, C_re, C_im, D, n_threads):
    """du (batch, L, H) and per-sequence g_Abar, g_Bbar, g_C (batch, H, M) as real/imag pairs."""
    batch, L, H = u.shape
    M = A_re.shape[1]
    du = np.empty_like(u)
    gA_re = np.zeros((batch, H, M), dtype=u.dtype)
    gA_im = np.zeros_like(gA_re)
    gB_re = np.zeros_like(gA_re)
    gB_im = np.zeros_like(gA_re)
    gC_re = np.zeros_like(gA_re)
    gC_im = np.zeros_like(gA_re)
    nA_im = -A_im  # conj(Abar) and conj(C) for the adjoint recurrence
    nC_im = -C_im
    n_seq = batch * H
    n_workers = min(n_threads, n_seq)
    zero = u.dtype.type(0)
    for w in prange(n_workers):
        # X[t + 1] holds x_t and X[0] = x_{-1} = 0
        X_re = np.zeros((L + 1, M), dtype=u.dtype)
        X_im = np.zeros((L + 1, M), dtype=u.dtype)
        x_re = np.empty(M, dtype=u.dtype)
        x_im = np.empty(M, dtype=u.dtype)
        for s in range(w, n_seq, n_workers):
            b, h = divmod(s, H)
            a_r, a_i, b_r, b_i, c_r = A_re[h], A_im[h], B_re[h], B_im[h], C_re[h]
            na_i, nc_i = nA_im[h], nC_im[h]
            x_re[:] = 0
            x_im[:] = 0
            ga_r, ga_i, gb_r, gb_i = gA_re[b, h], gA_im[b, h], gB_re[b, h], gB_im[b, h]
            gc_r, gc_i = gC_re[b, h], gC_im[b, h]
            for t in range(L):
                _advance(x_re, x_im, a_r, a_i, b_r, b_i, u[b, t, h])
                g2 = 2 * dy[b, t, h]
                for n in range(M):
                    X_re[t + 1, n] = x_re[n]
                    X_im[t + 1, n] = x_im[n]
                    gc_r[n] += g2 * x_re[n]
                    gc_i[n] -= g2 * x_im[n]
            lam_re, lam_im = x_re, x_im   # the states are stored; reuse their vectors
            lam_re[:] = 0
            lam_im[:] = 0
            for t in range(L - 1, -1, -1):
                u_t = u[b, t, h]
                # the adjoint runs the same recurrence backwards: conj(Abar), input conj(C)*2dy_t
                _advance(lam_re, lam_im, a_r, na_i, c_r, nc_i, 2 * dy[b, t, h])
                acc = zero
                for n in range(M):
                    acc += b_r[n] * lam_re[n] + b_i[n] * lam_im[n]
                du[b, t, h] = acc + D[h] * dy[b, t, h]
                for n in range(M):
                    ga_r[n] += X_re[t, n] * lam_re[n] + X_im[t, n] * lam_im[n]
                    ga_i[n] += X_re[t, n] * lam_im[n] - X_im[t, n] * lam_re[n]
                    gb_r[n] += u_t * lam_re[n]
                    gb_i[n] += u_t * lam_im[n]
    return du, gA_re, gA_im, gB_re, gB_im, gC_re, gC_im
