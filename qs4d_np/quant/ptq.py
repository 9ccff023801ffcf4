"""Deprecated: post-training quantization moved to ``qs4d_np.train.ptq``.

PTQ rebuilds and runs whole models, so it lives above ``models`` (in
``train``); ``quant`` stays below them. The old imports keep working:

    from qs4d_np.quant.ptq import calibrate                     # this module
    from qs4d_np.quant import calibrate, ptq, ptq_sweep, with_quant   # the package

Each use of an old name looks it up in ``qs4d_np.train.ptq`` (a PEP 562 module
``__getattr__``, which imports it then: importing ``quant`` never imports
``train``) and issues a ``DeprecationWarning`` naming the new path.
"""
from __future__ import annotations

import warnings
from typing import Any

# Every public name the module had before the move.
MOVED = ("MODES", "PTQ_TARGET_OPTIONS", "calibrate", "ptq", "ptq_sweep", "sweep_config", "with_quant")


def moved_attribute(module: str, name: str, names: tuple[str, ...] = MOVED) -> Any:
    """``name`` from ``qs4d_np.train.ptq`` when it is one of ``names``, with a DeprecationWarning that
    ``module.name`` moved there; AttributeError (naming ``module``) for any other name."""
    if name not in names:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    from qs4d_np.train import ptq as new_home  # deferred: train imports the models, which import quant

    warnings.warn(f"{module}.{name} is deprecated: import {name} from qs4d_np.train.ptq",
                  DeprecationWarning, stacklevel=3)
    return getattr(new_home, name)


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name)
