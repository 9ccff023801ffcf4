"""Numba kernels behind the ops; each has a float64 NumPy twin in reference/.

Numba's OpenMP worker threads and OpenBLAS's threads take turns on the same
cores (a fused kernel, then a matmul, then a kernel ...). By default idle
OpenMP workers spin for a while after each parallel region and slow the next
BLAS call; "passive" makes them sleep at once. Measured on the 2-core
machine, a GELU + PointwiseGLU forward/backward at (64, 784, 128) float32
used ~20-35% less CPU time this way. It must be set before Numba starts its
thread pool (the first parallel kernel call), so it is set on import here,
without overriding a value the user chose.

With PyTorch imported first, Numba's threading layer is chosen so the two thread pools
coexist (``threads.configure``).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from qs4d_np.kernels import threads  # noqa: E402  (after the OpenMP setting)

threads.configure()
