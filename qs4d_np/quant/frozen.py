"""``FrozenQuant``: a fake quantizer whose range is fixed, for streaming one time step at a time.

A stream must quantize every step exactly as the whole-sequence forward does, but
it cannot look at the whole sequence, so only static ranges (``fixed``,
calibrated ``running``, initialised ``learned``) can be frozen. The frozen form
holds the codes-per-unit ``inv`` and zero point of each scale and runs the very
kernel the forward runs (``kernels.fake_quant.fake_quant_forward``, rounding by
``round_code``): per element, ``q = clamp(round(v*inv) + zp, qmin, qmax)`` and
``v_hat = (q - zp) / inv`` in v's dtype. With zp = 0 this is step 3 of
``kernels.quant_scan`` (adding and subtracting 0 changes no value), so the same
form serves the recurrent state and the layer outputs.

``Quantizer.frozen`` and ``StateQuantizer.frozen_parts`` build them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qs4d_np.kernels import fake_quant as kern
from qs4d_np.quant.fake import QuantSpec
from qs4d_np.quant.grids import ROUNDING


@dataclass(frozen=True)
class FrozenQuant:
    """Fake quantization of (..., H) arrays along their last axis with frozen scales.

    ``inv``, ``zp``: (1,) per tensor or (H,) per channel, in the dtype the values come in
    (read-only copies); ``qmin``, ``qmax``: the grid's code bounds in that dtype;
    ``rounding``: the ``quant.grids.ROUNDING`` code. ``name`` names the quantizer in
    errors; ``check_finite``: raise on NaN / inf as the forward's quantizer does (the
    scan's state quantizer saturates instead and does not check).
    """

    inv: np.ndarray
    zp: np.ndarray
    qmin: np.floating
    qmax: np.floating
    rounding: int
    name: str
    check_finite: bool

    @classmethod
    def of(cls, spec: QuantSpec, inv: np.ndarray, zp: np.ndarray | None, name: str, dtype: np.dtype,
           check_finite: bool) -> "FrozenQuant":
        """From a ``QuantSpec`` (grid and rounding rule) and frozen scales (zp None: 0), in ``dtype``."""
        inv = np.array(inv, dtype=dtype).reshape(-1)
        zp = np.zeros_like(inv) if zp is None else np.array(zp, dtype=dtype).reshape(-1)
        if zp.shape != inv.shape:
            raise ValueError(f"{name}: zero points {zp.shape} do not match the scales {inv.shape}")
        for a in (inv, zp):
            a.setflags(write=False)
        return cls(inv, zp, *spec.code_grid.bounds(np.dtype(dtype)), ROUNDING[spec.rounding], name, check_finite)

    def apply(self, v: np.ndarray) -> np.ndarray:
        """Fake-quantize v (..., H), C-contiguous in the scales' dtype, in place; returns v."""
        if not v.flags.c_contiguous:  # reshape would copy, and the in-place result would be lost
            raise ValueError(f"{self.name}: FrozenQuant.apply needs a C-contiguous array, got strides {v.strides}")
        flat = v.reshape(-1)  # a view: v is contiguous
        C = self.inv.size
        if C != 1 and v.shape[-1] != C:
            raise ValueError(f"{self.name}: values of shape {v.shape} do not match the {C} frozen scales")
        P, Q = (1, flat.size) if C == 1 else (flat.size // C, 1)
        bad = kern.fake_quant_forward(flat, self.inv, self.zp, self.qmin, self.qmax, self.rounding, 1, P, C, Q,
                                      flat, flat[:0], False)
        if bad and self.check_finite:
            raise ValueError(f"{self.name}: the stream's values contain {bad} non-finite value(s) (NaN or inf); "
                             "cannot quantize")
        return v
