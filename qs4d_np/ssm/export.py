"""What the evaluation-mode recurrent S4D layer computes with, for the integer golden model
(``S4D.quantized_recurrent``): typed records of codes and scales.

Fields read as attributes (``ex.Abar``); ``ex["Abar"]`` is the same (the dict the method
returned before these records existed).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from qs4d_np.quant.fake import QuantTensor
from qs4d_np.quant.grids import Grid
from qs4d_np.quant.scan import StateQuant


class _ByKey:
    """``record[name]`` is ``record.name``, for the callers of the former dict."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ActScales(_ByKey):
    """The output quantizer's scales: ``inv_scale`` (in the layer's dtype, as the forward quantizes
    with it) and ``zero_point`` (int64), each (1,) per tensor or (H,) per channel; its ``grid`` and
    ``rounding`` rule name."""

    inv_scale: np.ndarray
    zero_point: np.ndarray
    grid: Grid
    rounding: str


@dataclass(frozen=True)
class RecurrentExport(_ByKey):
    """The quantized tensors of one layer's evaluation-mode recurrent forward (H = d_model,
    M = d_state/2); a target the config leaves float comes as a float array.

    * ``Abar``, ``Bbar``: ``QuantTensor`` with (2, H, M) codes (real, imaginary) or (H, M)
      complex128; ``C`` likewise; ``D``: (H,) codes or floats;
    * ``state``: the ``StateQuant`` of the scan (codes per unit of the real / imaginary state)
      or None for a float state; ``clip``: the state bound (inf = none);
    * ``linear``: the mixing weight (H, 2H) codes or floats and ``linear_bias`` (2H,), None
      without mixing; ``act``: ``ActScales`` or None.
    """

    Abar: QuantTensor | np.ndarray
    Bbar: QuantTensor | np.ndarray
    C: QuantTensor | np.ndarray
    D: QuantTensor | np.ndarray
    state: StateQuant | None
    clip: float
    linear: QuantTensor | np.ndarray | None
    linear_bias: np.ndarray | None
    act: ActScales | None
