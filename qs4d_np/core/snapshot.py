"""Frozen copies of ops for streaming, and a check that the original has not changed since.

A stream (``S4DModel.stream()``) runs evaluation forwards on copies of the model's ops,
taken once, so that each time step costs only its arithmetic; ``ParamSnapshot`` tells
whether the original still holds the values the copies were taken from.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

from qs4d_np.core.module import Module


def snapshot(op: Module) -> Module:
    """A deep copy of ``op`` and its children without their forward caches: its parameters and
    buffers as they are now, for a stream to run evaluation forwards on (never a backward); its
    ops have no ``perturbation``."""
    # an op's value perturbation (``core.perturb``, set by a noise block around a forward) is not copied:
    # the copy computes with the clean values
    memo: dict[int, Any] = {id(m.perturbation): None for _, m in op.modules()
                            if getattr(m, "perturbation", None) is not None}
    with op.kept_caches():
        op.clear_caches()  # a pending training cache can be large; the copy needs none
        return copy.deepcopy(op, memo)


def _arrays(module: Module) -> dict[str, np.ndarray]:
    """Every parameter and buffer of ``module`` and its descendants (shared arrays)."""
    out = {f"param:{key}": value for key, value in module.params.items()}
    out.update({f"buffer:{prefix}:{key}": value for prefix, m in module.modules()
                for key, value in getattr(m, "buffers", {}).items()})
    return out


class ParamSnapshot:
    """Copies of a module's parameters and buffers (quantizer ranges included) taken when a stream
    is built; ``is_current()`` tells whether the module still holds exactly those values.
    ``track=False`` copies nothing (a stepper inside a stream, or built for a single step)."""

    def __init__(self, module: Module, track: bool = True) -> None:
        self.module = module
        self.arrays = {key: value.copy() for key, value in _arrays(module).items()} if track else None

    def is_current(self) -> bool:
        if self.arrays is None:
            raise RuntimeError(f"this {type(self.module).__name__} stepper was built without a snapshot (it is "
                               "part of a stream, or was built for one step): ask the stream's is_current()")
        now = _arrays(self.module)
        return now.keys() == self.arrays.keys() and all(
            now[key].shape == value.shape and np.array_equal(now[key], value)
            for key, value in self.arrays.items())
