"""``StateQuantizer``: the quantizer of the recurrent S4D state x_t, in one place.

The state of a quantized recurrent layer is re-quantized after every update
(Zhao et al. 2025), inside the scan, so it cannot be a plain fake-quant op on a
tensor: the quantized scan (``quant.scan.quant_scan``, the Numba kernel
``kernels.quant_scan`` its fast path, ``reference/quant.py`` its twin) applies
it at each step. This module owns everything else about it:

* the grid and the rounding rule (its ``QuantSpec``; symmetric, zero point 0, so the
  integer code is the golden model's state register);
* the range, from the ``Quantizer`` range sources it inherits: ``absmax`` (max |x|
  of this batch's float states, like the reference's per-call scales), ``running``
  (buffers ``running_lo`` / ``running_hi``), ``fixed`` (``fixed_range``) or
  ``learned`` (LSQ parameter ``step``, initialised to the float states' absmax /
  qpos). ``scan_scales`` resolves it for one scan into the kernel's ``StateQuant``;
* calibration of the ``running`` range. In recurrent training each batch is
  quantized with the range from before it, and the quantized scan's own
  pre-quantization maxima (max |w|, w the clipped value the quantizer sees) are
  folded in after it (one batch of lag, no float pass); the first batch, and
  ``calibrate`` (``calibrating``), fold in the batch's float states instead;
* the straight-through backward: the scan returns dL/dstep; ``step_grad`` turns it
  into the learned step's gradient with the LSQ scale 1/sqrt(count*qpos);
* the frozen form for streaming (``frozen_parts``): one ``FrozenQuant`` per part.

Scales run per tensor, per channel (``axis`` 0 of the (H, M) state) and, with
``complex_mode="cartesian"``, separately for the real and imaginary parts
(``n_scales`` = 1, 2, H or 2H; real parts first).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from qs4d_np.core.checks import NonFiniteError
from qs4d_np.kernels.fake_quant import lsq_grad_scale
from qs4d_np.quant.frozen import FrozenQuant
from qs4d_np.quant.quantizer import Quantizer
from qs4d_np.quant.scan import StateQuant, state_absmax


class StateQuantizer(Quantizer):
    """The recurrent state quantizer (module docstring); a ``Quantizer`` for its range and checkpoint
    entries (``step``, ``running_lo`` / ``running_hi``), applied by the quantized scan."""

    @property
    def per_channel(self) -> bool:
        return self.spec.axis is not None

    @property
    def per_part(self) -> bool:
        """Separate scales for the real and the imaginary part."""
        return self.spec.complex_mode == "cartesian"

    def _check_recurrent(self) -> None:
        if self.scale_mode == "absmean":
            raise ValueError("the state target's scale_mode='absmean' has no recurrent-mode meaning; "
                             "use absmax, running, fixed or learned")
        if not self.spec.symmetric:  # the state register is a signed code with zero point 0 (golden model, scan)
            raise ValueError("recurrent mode quantizes the state symmetrically, but the state target has "
                             "symmetric=False; set target_options={'state': {'symmetric': True}} (conv mode's "
                             "K and u may stay asymmetric)")

    def _scale_order(self, absmax: np.ndarray) -> np.ndarray:
        """(H, 2) maxima per channel and part -> one range per scale (per channel: real parts first)."""
        if self.per_channel:
            return absmax.T.reshape(-1) if self.per_part else absmax.max(axis=1)
        return absmax.max(axis=0) if self.per_part else absmax.max(keepdims=True).reshape(1)

    def scan_scales(self, u: np.ndarray | None, Abar: np.ndarray, Bbar: np.ndarray, clip: float,
                    training: bool = False) -> StateQuant:
        """The ``StateQuant`` of one quantized scan of u (batch, L, H) with Abar, Bbar (H, M) and the
        state bound ``clip`` (inf: none); updates a running range as the module docstring says.

        ``u=None``: no data, so only a static range will do (fixed, calibrated running, initialised
        learned; export and streaming).
        """
        self._check_recurrent()
        spec, mode = self.spec, self.scale_mode

        def float_state_range() -> np.ndarray:
            r = self._scale_order(state_absmax(u, Abar, Bbar, StateQuant(None), clip))
            if not np.isfinite(r).all():  # the float recurrence diverged (|Abar| >= 1 without a clip)
                raise NonFiniteError(f"the state quantizer's range: {int(np.size(r) - np.isfinite(r).sum())} of "
                                     f"{np.size(r)} float state ranges of this batch are not finite (a diverging "
                                     f"recurrence; |Abar| max {float(np.abs(Abar).max()):.6g})")
            return r

        def fold(wmax: np.ndarray) -> None:
            r = self._scale_order(wmax)
            self.observe(-r, r)

        observer: Callable[[np.ndarray], None] | None = None
        if u is not None and mode == "absmax":  # this batch's float states, like the reference
            r = float_state_range()
            inv, _ = spec.scales(-r, r, np.dtype(np.float64))
        else:
            if u is not None and mode == "learned" and not self.step_ready:
                self.set_step(np.maximum(float_state_range(), spec.min_range) / spec.code_grid.qpos)
            if u is not None and self.updates_range(training):
                if training and self.calibrated and not self.calibrating:
                    observer = fold  # quantize with the range from before this batch
                else:  # the first batch and calibration: this batch's float states
                    r = float_state_range()
                    self.observe(-r, r)
            inv, _ = self.static_scales(np.dtype(np.float64))
        H = Abar.shape[0]
        if self.per_part:  # (2H,) or (2,) -> (H, 2)
            inv = inv.reshape(2, -1).T if self.per_channel else np.tile(inv, (H, 1))
        return StateQuant(spec, inv if self.per_channel or self.per_part else float(inv[0]), self.ste, observer)

    def step_grad(self, dstep: np.ndarray, entries: int) -> None:
        """The learned step's gradient from the scan's dL/dstep (shaped like ``StateQuant.inv``) into
        ``grads['step']``, LSQ-scaled by 1/sqrt(count * qpos) with count = ``entries`` (real state
        values of the forward, 2*B*L*H*M) per scale. No-op unless learned."""
        if self.scale_mode != "learned":
            return
        dstep = np.asarray(dstep, dtype=np.float64)
        if dstep.ndim == 2:  # (H, 2): per channel and part, or per part tiled over channels
            flat = dstep.T.reshape(-1) if self.per_channel else dstep.sum(axis=0)
        else:
            flat = dstep.reshape(-1)
        g = lsq_grad_scale(entries / self.n_scales, self.spec.code_grid.qpos) if self.lsq_grad_scale else 1.0
        self._grads["step"] = (flat * g).astype(self.dtype)

    def frozen(self, dtype: np.dtype) -> FrozenQuant:
        """Not for the state: it is frozen per part (``frozen_parts``)."""
        raise TypeError(f"{self.name}: the state quantizer freezes into one quantizer per part; "
                        "use frozen_parts(H, dtype)")

    def frozen_parts(self, H: int, dtype: np.dtype) -> tuple[FrozenQuant, FrozenQuant]:
        """The static range frozen for streaming: (real part, imaginary part), each with (H,) codes per
        unit in ``dtype`` and no finiteness check (the scan saturates). Raises for a data-dependent range."""
        inv = self.scan_scales(None, np.zeros((H, 1)), np.zeros((H, 1)), np.inf).per_channel_inv(H, dtype)
        return tuple(FrozenQuant.of(self.spec, inv[:, i], None, f"{self.name} ({part})", dtype, False)
                     for i, part in enumerate(("real part", "imaginary part")))
