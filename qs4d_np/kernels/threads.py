"""Numba's threading layer next to PyTorch in one process.

PyTorch's CPU build runs its own OpenMP thread pool. When torch is imported first and its ops
alternate with ours (a notebook comparing the two), Numba's default OpenMP layer and torch's
pool fight for the cores: measured with ``benchmarks/bench_threads.py`` on the project's
2-core VM, a 1024 x 256 noisy crossbar MVM batch took 2.2x as long after torch ops as without
torch, and as long as without torch on Numba's ``workqueue`` layer (README, performance).

The layer is fixed at Numba's first parallel kernel launch, so :func:`configure` must run
before it. ``qs4d_np.kernels`` calls it on import: with torch already imported it picks
``workqueue``, unless the user chose a layer (``NUMBA_THREADING_LAYER``). A program that
imports torch later calls ``configure("workqueue")`` itself, before the first computation.
``workqueue`` does not support launching parallel kernels from several Python threads at
once (qs4d_np never does; its own thread pool runs BLAS and FFT calls only).
"""
from __future__ import annotations

import os
import sys

import numba

LAYERS = ("default", "tbb", "omp", "workqueue")
ENV = "NUMBA_THREADING_LAYER"


def configure(layer: str | None = None) -> str:
    """Set Numba's threading layer (one of ``LAYERS``) before its first parallel launch; returns
    the layer set. ``None``: ``workqueue`` when torch is imported, else Numba's choice; a layer
    the user put in ``NUMBA_THREADING_LAYER`` is kept then. Raises RuntimeError once Numba's
    threads have started with another layer (it cannot be changed in a running process)."""
    if layer is None:
        if os.environ.get(ENV) or "torch" not in sys.modules:
            return str(numba.config.THREADING_LAYER)
        layer = "workqueue"
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {list(LAYERS)}, got {layer!r}")
    try:
        current = numba.threading_layer()  # raises ValueError until the threads have started
    except ValueError:
        numba.config.THREADING_LAYER = layer
        return layer
    if layer not in ("default", current):
        raise RuntimeError(f"Numba's threads already run the {current!r} layer; configure({layer!r}) "
                           "must be called before the first parallel computation")
    return current
