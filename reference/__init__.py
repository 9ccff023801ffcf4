"""Slow, obviously correct float64 NumPy twins of the fast kernels, used by the tests."""
