"""BLAS matrix products split over rows on a small thread pool, with BLAS itself on one thread.

Why: after every call OpenBLAS's worker threads busy-wait for new work (up to
~0.1 s by default). In a training step, BLAS products alternate with Numba's
parallel kernels, so on a few cores the spinning BLAS workers and Numba's
workers fight for the CPUs. Measured on the project's 2-core machine under
load, for GELU + the H -> 2H GLU layer forward and backward at (50176, 128)
float32: 0.8-0.9 s wall with OpenBLAS's own threads, 0.3-0.4 s with this
row split (and half the CPU time). NumPy releases the GIL inside BLAS, and
the pool's threads block (not spin) when idle.

Products too small to pay for the hand-off (``MIN_SPLIT_FLOPS``) run as one
call, also with BLAS on one thread: measured under load, a (256, 128) @
(128, 256) float32 product took ~12 ms CPU with OpenBLAS's own threads
(waking and spinning) and 0.25 ms on one thread; the thread-limit context
costs ~0.02 ms. Results depend on the number of row chunks (the pool size)
by rounding only, like multi-threaded BLAS itself.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
from threadpoolctl import ThreadpoolController

MIN_SPLIT_FLOPS = 1 << 24

_state: dict[str, Any] = {}
# A forked child inherits the pool object but not its threads: start afresh there.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_state.clear)


def n_workers() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _pool_and_blas() -> tuple[ThreadPoolExecutor, Any]:
    # created on first use, after NumPy/SciPy have loaded their BLAS libraries
    if not _state:
        _state["blas"] = ThreadpoolController().select(user_api="blas")
        _state["pool"] = ThreadPoolExecutor(n_workers(), thread_name_prefix="qs4d-matmul")
    return _state["pool"], _state["blas"]


def _row_chunks(rows: int, n: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, rows, n + 1).astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def _split(rows: int, flops: int) -> list[tuple[int, int]] | None:
    n = min(n_workers(), rows)
    return None if n < 2 or flops < MIN_SPLIT_FLOPS else _row_chunks(rows, n)


def run_row_chunks(fn: Callable[[int, int], Any], rows: int, flops: int) -> None:
    """Call fn(lo, hi) over row chunks of [0, rows) on the pool (inline when ``flops`` is small).

    For other GIL-releasing NumPy work split like the products (the FFT
    convolution's inverse transforms); ``fn`` must write disjoint rows.
    """
    chunks = _split(rows, flops)
    if chunks is None:
        fn(0, rows)
        return
    pool, _ = _pool_and_blas()
    for f in [pool.submit(fn, lo, hi) for lo, hi in chunks]:
        f.result()


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a (R, K) @ b (K, N) -> (R, N), the rows of ``a`` split over the pool; fills ``out`` if given."""
    rows, k = a.shape
    if out is None:
        out = np.empty((rows, b.shape[1]), dtype=np.result_type(a, b))
    chunks = _split(rows, rows * k * b.shape[1])
    pool, blas = _pool_and_blas()
    with blas.limit(limits=1):
        if chunks is None:
            return np.matmul(a, b, out=out)
        for f in [pool.submit(np.matmul, a[lo:hi], b, out[lo:hi]) for lo, hi in chunks]:
            f.result()
    return out


def matmul_tn(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a.T @ b for a (R, K), b (R, N) -> (K, N): partial products over row chunks, added in order."""
    rows, k = a.shape
    if b.shape[0] != rows:
        raise ValueError(f"b must have {rows} rows like a, got shape {b.shape}")
    chunks = _split(rows, rows * k * b.shape[1])
    pool, blas = _pool_and_blas()
    with blas.limit(limits=1):
        if chunks is None:
            return a.T @ b
        partials = [f.result() for f in [pool.submit(np.matmul, a[lo:hi].T, b[lo:hi]) for lo, hi in chunks]]
    total = partials[0]
    for p in partials[1:]:
        total += p
    return total
