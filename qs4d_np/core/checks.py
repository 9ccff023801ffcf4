"""Argument checks that fail early with a message naming the argument.

Every public entry point validates its inputs here, so bad input never turns
into a silent NaN, a silent broadcast or a crash deep inside a Numba kernel.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


class NonFiniteError(ValueError):
    """A computation (not its input) produced NaN or inf: the message names where it first did."""


def check_finite_output(where: str, x: np.ndarray) -> np.ndarray:
    """Return ``x`` (the output of ``where``), or raise :class:`NonFiniteError` when it holds NaN/inf."""
    if not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        worst = float(np.max(np.abs(x[np.isfinite(x)]), initial=0.0))
        raise NonFiniteError(f"the forward went non-finite in {where}: {bad} of {np.size(x)} output value(s) "
                             f"are NaN/inf (largest finite magnitude {worst:.3g}); inputs or weights too large "
                             f"for {x.dtype}?")
    return x


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` as a bool; reject 1 / 0 and other stand-ins (True == 1 in Python)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_int(name: str, value: object, *, min_value: int | None = None,
              max_value: int | None = None) -> int:
    """Return ``value`` as an int; reject bools, floats and out-of-range values."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    if max_value is not None and value > max_value:
        raise ValueError(f"{name} must be <= {max_value}, got {value}")
    return value


def check_float(name: str, value: object, *, min_value: float | None = None,
                max_value: float | None = None, min_inclusive: bool = True,
                max_inclusive: bool = True) -> float:
    """Return ``value`` as a finite float inside the given bounds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if min_value is not None and (value < min_value or (not min_inclusive and value == min_value)):
        op = ">=" if min_inclusive else ">"
        raise ValueError(f"{name} must be {op} {min_value}, got {value}")
    if max_value is not None and (value > max_value or (not max_inclusive and value == max_value)):
        op = "<=" if max_inclusive else "<"
        raise ValueError(f"{name} must be {op} {max_value}, got {value}")
    return value


def check_array(name: str, x: object, *, ndim: int | None = None,
                shape: Sequence[int | None] | None = None, finite: bool = True,
                allow_complex: bool = False, min_size: int | None = None) -> np.ndarray:
    """Validate an array argument and return it as an ndarray (no copy if possible).

    ``shape`` may contain None for "any size" in that position. ``min_size``
    requires every axis to have at least that many entries (e.g. length >= 1).
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype.kind not in ("f", "c", "i", "u"):
        raise TypeError(f"{name} must hold numbers, got dtype {x.dtype}")
    if x.dtype.kind == "c" and not allow_complex:
        raise TypeError(f"{name} must be real, got complex dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    if shape is not None:
        if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"{name} must have shape {want}, got {x.shape}")
    if min_size is not None and any(d < min_size for d in x.shape):
        raise ValueError(f"{name} must have at least {min_size} entries along every axis, got shape {x.shape}")
    if finite and x.dtype.kind in ("f", "c") and not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")
    return x


def check_sequence_input(name: str, x: object, channels: int) -> np.ndarray:
    """Check an activation shaped (batch, length, channels) with finite values."""
    x = check_array(name, x, ndim=3, finite=True)
    if x.shape[2] != channels:
        raise ValueError(f"{name} must have shape (batch, length, {channels}), got {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have batch >= 1 and length >= 1, got shape {x.shape}")
    return x


def check_labeled(x_name: str, x: object, y_name: str, y: object, channels: int,
                  classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Check sequences x (batch, length, channels) and their integer labels y (batch,) in 0..classes-1."""
    x = check_sequence_input(x_name, x, channels)
    y = check_array(y_name, y, ndim=1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{y_name} must have shape ({x.shape[0]},) (one label per sequence of {x_name}), "
                         f"got {y.shape}")
    if y.dtype.kind not in "iu":
        raise TypeError(f"{y_name} must hold integer class labels, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"{y_name} must hold labels in 0..{classes - 1}, got values in {y.min()}..{y.max()}")
    return x, y


def check_grad_like(name: str, grad: object, expected_shape: tuple[int, ...]) -> np.ndarray:
    """Check that an upstream gradient matches the shape of the forward output."""
    grad = check_array(name, grad, finite=True)
    if grad.shape != tuple(expected_shape):
        raise ValueError(f"{name} must have the forward output's shape {tuple(expected_shape)}, got {grad.shape}")
    return grad
