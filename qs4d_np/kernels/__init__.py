"""Numba kernels behind the ops; each has a float64 NumPy twin in reference/."""
