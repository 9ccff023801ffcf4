"""Quantization for QS4D: fake quantizers with straight-through gradients, ``QuantConfig``,
and the quantized-state recurrent scan.

Modules (one job each):

* ``grids``: n quantization states -> integer code range (narrow / qs4d / full), bits,
  rounding rule names;
* ``fake``: the functional quantizer (``fake_quant``, ``quantize`` -> ``QuantTensor``
  with codes, inv_scale, zero_point), ``QuantSpec`` and ``ste_backward``;
* ``quantizer``: the ``Quantizer`` op (absmax / absmean / fixed / running / learned ranges);
* ``state``: ``StateQuantizer``, the recurrent state's quantizer (range, calibration, LSQ
  step gradient, frozen form); ``frozen``: ``FrozenQuant``, a static-range quantizer for streaming;
* ``config``: ``QuantConfig`` (levels and options per target and layer, JSON);
* ``scan``: checked entry points of the quantized-state recurrent scan
  (``kernels.quant_scan``), ``StateQuant``;
* ``discrete``: discretization from a quantized A, the polar ``discrete`` Abar;
* ``weights``: ``WeightQuant``, a quantized weight swapped into Linear / PointwiseGLU;
* ``ptq``: deprecated aliases only: PTQ (``with_quant``, ``calibrate``, ``ptq``, ``ptq_sweep``)
  builds whole models and lives in ``qs4d_np.train.ptq``.

How the pieces plug into the S4D layer and model (implemented in ``ssm.s4d.S4D``
and ``models.s4d_model.S4DModel``; ``ssm.core``'s docstring has the table of places):

1. ``S4DModel(..., quant=QuantConfig(...))`` passes the config down; in layer i the core (A ... state)
   and the layer (linear, act) ask
   ``cfg.quantizer_for(target, layer=i, axis=..., n_scales=...)`` for each target and
   gets a ``Quantizer`` or None (float). Quantizers become children
   (``add_child("quant_A", q)``) so learned steps appear in ``.params`` and their
   gradients in ``.grads``; running-range buffers live in ``Quantizer.buffers`` and must be
   saved with checkpoints next to ``.params`` (``load_buffers`` restores them).
2. Convolution mode, at the reference's places (SPEC.md section 2):
   A: quantize ``log_A_real``'s image ``Re(A)`` and ``A_imag`` separately before
   discretization (two per-tensor quantizers, or one complex quantizer with
   complex_mode="cartesian" on A); C: complex_mode="shared"; dt: quantize ``log_dt``;
   state: the kernel K and the input u with ``levels // 2`` states (``state`` levels are
   halved by the caller, as the reference does; the reference's state n = 2 leaves one
   state, all zeros, which we reject: levels must stay >= 2); linear / coder: the weight only; act:
   the block output after GLU. The layer's backward calls each quantizer's
   ``backward`` on the gradient of its output (identity STE by default), then chains
   through the discretization as in float.
3. Recurrent mode (SPEC.md section 3): discretize (``continuous``), or take Abar as a
   parameter (``discrete``, kept inside the unit circle by the caller) or as a constant
   (``frozen``); quantize Abar, Bbar and C (complex_mode="cartesian") and D with their
   quantizers, run ``scan.quant_scan(u, Abar_q, Bbar_q, C_q, D_q, state, clip)`` with
   ``state = StateQuantizer.scan_scales(u, Abar_q, Bbar_q, clip, training)``, and in the
   backward pass the returned gradients through each quantizer's ``backward`` (the state's
   step gradient through ``StateQuantizer.step_grad``).
4. The integer golden model reproduces the recurrent step from ``QuantTensor`` codes of
   Abar, Bbar, C, D and the state's ``inv`` (power of two): the exact per-step order is in
   ``kernels.quant_scan``'s docstring (multiply-add, clip, multiply by inv, round by the
   named rule, saturate to [qmin, qmax], divide by inv).
"""
from typing import Any

from qs4d_np.quant.config import TARGETS, QuantConfig
from qs4d_np.quant.fake import QuantSpec, QuantTensor, fake_quant, quantize, ste_backward
from qs4d_np.quant.grids import GRIDS, ROUNDING, Grid, make_grid
from qs4d_np.quant.ptq import moved_attribute
from qs4d_np.quant.quantizer import Quantizer
from qs4d_np.quant.scan import StateQuant, quant_scan, quant_scan_backward
from qs4d_np.quant.state import StateQuantizer
from qs4d_np.quant.frozen import FrozenQuant

# Importing the submodule bound ``ptq`` to it here; unbound, ``qs4d_np.quant.ptq`` resolves through
# ``__getattr__`` to the ``ptq`` function, as it did before PTQ moved to ``qs4d_np.train.ptq``.
del ptq
DEPRECATED_PTQ = ("calibrate", "ptq", "ptq_sweep", "with_quant")

__all__ = [
    "GRIDS", "ROUNDING", "TARGETS", "FrozenQuant", "Grid", "QuantConfig", "QuantSpec", "QuantTensor", "Quantizer",
    "StateQuant", "StateQuantizer", "calibrate", "fake_quant", "make_grid", "ptq", "ptq_sweep", "quant_scan", "quant_scan_backward",
    "quantize", "ste_backward", "with_quant",
]


def __getattr__(name: str) -> Any:
    """The deprecated PTQ aliases (``DEPRECATED_PTQ``), looked up in ``qs4d_np.train.ptq`` at each use."""
    return moved_attribute(__name__, name, DEPRECATED_PTQ)
