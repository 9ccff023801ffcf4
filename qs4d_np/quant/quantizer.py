"""``Quantizer``: the stateful fake-quant op with a straight-through backward.

Range sources (``scale_mode``):

* ``absmax``, ``absmean``, ``fixed``: as ``qs4d_np.quant.fake`` (no state);
* ``running``: a calibrated running range. In training each forward takes the
  batch range, folds it into the buffers by an exponential moving average
  (``momentum``; the first batch initialises them) and quantizes with the
  updated buffers; in evaluation the buffers are frozen, so outputs never
  depend on the rest of the batch. Evaluating before any calibration fails.
* ``learned``: LSQ (Esser et al. 2020). The parameter ``step`` (one per scale)
  sets inv = 1/step; it is initialised (buffer ``step_ready``; until then the
  step holds a finite placeholder) on the first forward to
  2*mean|x|/sqrt(qpos) unless ``init_range`` is given (step = init_range/qpos).
  Its gradient is sum(grad * (round(v) - v)) where the code did not saturate
  and qmin / qmax where it did (v = x/step), times 1/sqrt(count * qpos) when
  ``lsq_grad_scale``. Symmetric only; steps below min_range/qpos are floored.

Backward (``ste``): ``identity`` (the reference) passes the gradient through
unchanged; ``clipped`` zeroes it where the code saturated (round(x*inv) + zp
outside [qmin, qmax]).

``max_modulus`` (a spec option, complex tensors only) keeps every code pair
inside the disk of that radius (``QuantSpec``); forward, ``quantize`` and the
learned step's gradient all use the codes it chose, e.g. for Abar
(``QuantConfig`` option ``abar_bound``).

``n_scales`` is the number of scales the op keeps (1 per tensor; the channel
count per channel; doubled for complex tensors with ``complex_mode="cartesian"``,
real parts' scales first). It is needed up front only for ``learned``, whose
``step`` parameter must exist before an optimizer is built.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from qs4d_np.core.checks import check_bool, check_choice, check_float, check_int
from qs4d_np.core.module import Module
from qs4d_np.kernels.fake_quant import lsq_grad_scale
from qs4d_np.quant.fake import STE_MODES, QuantSpec, QuantState, QuantTensor, ste_backward
from qs4d_np.quant.frozen import FrozenQuant

QUANTIZER_SCALE_MODES = ("absmax", "absmean", "fixed", "running", "learned")


class Quantizer(Module):
    """Fake quantization to ``levels`` states (see the module docstring).

    ``forward(x, training)`` returns x_hat (x's shape and dtype); ``backward``
    returns dL/dx and, for ``learned``, sets ``grads['step']`` (n_scales,).
    ``levels`` is a number of states with spec options (grid, symmetric, axis, rounding,
    power_of_two, complex_mode, min_range, max_modulus: those of ``QuantSpec``), or a
    ``QuantSpec`` itself.
    """

    def __init__(self, levels: int | QuantSpec, *, scale_mode: str = "absmax", ste: str = "identity",
                 fixed_range: object = None, momentum: float = 0.1, init_range: float | None = None,
                 lsq_grad_scale: bool = True, n_scales: int = 1, dtype: type = np.float32,
                 name: str = "x", **spec_options: object) -> None:
        super().__init__()
        check_choice("scale_mode", scale_mode, QUANTIZER_SCALE_MODES)
        check_choice("ste", ste, STE_MODES)
        check_choice("dtype", np.dtype(dtype), (np.dtype(np.float32), np.dtype(np.float64)))
        unknown = set(spec_options) - (set(QuantSpec.__dataclass_fields__) - {"levels"})
        if unknown:
            raise TypeError(f"unknown Quantizer option(s) {sorted(unknown)}")
        if isinstance(levels, QuantSpec):  # a spec built elsewhere (QuantConfig.quantizer_for), used as is
            if spec_options:
                raise TypeError(f"give either a QuantSpec or levels with spec options, got both "
                                f"({sorted(spec_options)})")
            self.spec = levels
        else:
            self.spec = QuantSpec(levels, **spec_options)  # type: ignore[arg-type]
        self.scale_mode = scale_mode
        self.ste = ste
        self.name = name
        self.dtype = np.dtype(dtype)
        self.momentum = check_float("momentum", momentum, min_value=0.0, max_value=1.0,
                                    min_inclusive=False)
        self.n_scales = check_int("n_scales", n_scales, min_value=1)
        self.lsq_grad_scale = check_bool("lsq_grad_scale", lsq_grad_scale)
        self.fixed_range = fixed_range
        if scale_mode != "fixed" and fixed_range is not None:
            raise ValueError(f"fixed_range is only used with scale_mode='fixed', got scale_mode={scale_mode!r}")
        self.buffers: dict[str, np.ndarray] = {}
        # Set by ``qs4d_np.train.ptq.calibrate``: running ranges update in evaluation forwards too.
        self.calibrating = False
        if scale_mode == "learned":
            if not self.spec.symmetric or self.spec.power_of_two:
                raise ValueError("scale_mode='learned' needs symmetric=True and power_of_two=False")
            # A finite placeholder plus the ``step_ready`` buffer flag, not a NaN sentinel: a
            # quantizer the training mode never runs must still be saveable (the trainer refuses
            # NaN parameters) and load / resume must bring back whether the step was initialised.
            self._params["step"] = np.ones(self.n_scales, dtype=self.dtype)
            self.buffers["step_ready"] = np.zeros(1, dtype=bool)
            if init_range is not None:
                r = check_float("init_range", init_range, min_value=0.0, min_inclusive=False)
                self.set_step(r / self.spec.code_grid.qpos)
        elif init_range is not None:
            raise ValueError("init_range is only used with scale_mode='learned'")

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def calibrated(self) -> bool:
        return "running_lo" in self.buffers

    @property
    def step_ready(self) -> bool:
        """Whether the learned step has been initialised (init_range, a forward or a checkpoint)."""
        return bool(self.buffers["step_ready"][0])

    def set_step(self, step: object) -> None:
        """Set the learned step (a scalar or (n_scales,)) in place and mark it initialised."""
        self._params["step"][:] = step
        self.buffers["step_ready"][:] = True

    def reset_step(self) -> None:
        """Forget the learned step: the next forward initialises it from its input."""
        self.buffers["step_ready"][:] = False

    def load_buffers(self, buffers: dict[str, np.ndarray]) -> None:
        """Restore ``running_lo`` / ``running_hi``, each (n_scales,) finite with lo <= hi, from a checkpoint."""
        if set(buffers) != {"running_lo", "running_hi"}:
            raise ValueError(f"buffers must hold running_lo and running_hi, got {sorted(buffers)}")
        loaded = {}
        for key in ("running_lo", "running_hi"):
            v = np.asarray(buffers[key])
            if v.shape != (self.n_scales,):
                raise ValueError(f"Quantizer {self.name!r}: buffer {key} has shape {v.shape}, "
                                 f"expected ({self.n_scales},) (n_scales={self.n_scales})")
            if v.dtype.kind not in "iuf":
                raise ValueError(f"Quantizer {self.name!r}: buffer {key} must be real numbers, got dtype {v.dtype}")
            v = v.astype(np.float64)
            if not np.isfinite(v).all():
                raise ValueError(f"Quantizer {self.name!r}: buffer {key} holds NaN or inf: {v}")
            loaded[key] = v
        if (loaded["running_lo"] > loaded["running_hi"]).any():
            raise ValueError(f"Quantizer {self.name!r}: buffers need running_lo <= running_hi, got "
                             f"running_lo={loaded['running_lo']}, running_hi={loaded['running_hi']}")
        self.buffers.update(loaded)

    def _check_scales(self, channels: int) -> None:
        if channels != self.n_scales:
            raise ValueError(f"Quantizer {self.name!r} keeps n_scales={self.n_scales} scales but its input "
                             f"needs {channels} (axis={self.spec.axis}, complex_mode={self.spec.complex_mode!r})")

    def observe(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Fold one batch's ranges (lo, hi), each (n_scales,), into the running buffers.

        The first call initialises them; later calls take an exponential moving
        average with ``momentum``. ``forward`` calls it in training (or while
        ``calibrating``); owners that compute a range themselves (the recurrent
        state's absmax) call it directly.
        """
        lo = np.asarray(lo, dtype=np.float64).reshape(-1)
        hi = np.asarray(hi, dtype=np.float64).reshape(-1)
        self._check_scales(lo.size)
        if self.calibrated:
            m = self.momentum
            lo = (1 - m) * self.buffers["running_lo"] + m * lo
            hi = (1 - m) * self.buffers["running_hi"] + m * hi
        self.buffers.update(running_lo=lo, running_hi=hi)

    def updates_range(self, training: bool) -> bool:
        """Whether a forward now updates the running range (training or calibrating)."""
        return self.scale_mode == "running" and (training or self.calibrating)

    def _scales(self, x: np.ndarray, training: bool):
        """(layout, inv, zp) for ``x`` with this op's range source; updates running ranges."""
        spec = self.spec
        lay = spec.layout(x, self.name)
        real = np.dtype(lay.dtype.type(0).real.dtype)
        mode = self.scale_mode
        if mode in ("absmax", "absmean"):
            inv, zp = spec.scales(*spec.stats_range(lay.flatten(x), lay, mode, self.name), real)
            return lay, inv, zp
        if mode == "fixed":
            return lay, *spec.scales(*spec.fixed_range(self.fixed_range, lay), real)
        self._check_scales(lay.channels)
        if self.updates_range(training):
            self.observe(*spec.stats_range(lay.flatten(x), lay, "absmax", self.name))
        if mode == "learned" and not self.step_ready:
            _, hi = spec.stats_range(lay.flatten(x), lay, "absmean", self.name)
            self.set_step(hi / spec.code_grid.qpos)
        inv, zp = self.static_scales(real)
        return lay, inv, zp

    def static_scales(self, dtype: np.dtype = np.dtype(np.float64)) -> tuple[np.ndarray, np.ndarray]:
        """(inv, zp), each (n_scales,), of a range that does not depend on the data being
        quantized: ``fixed``, calibrated ``running`` or initialised ``learned`` (e.g. for export)."""
        dtype = np.dtype(dtype)
        mode = self.scale_mode
        if mode in ("absmax", "absmean"):
            raise ValueError(f"Quantizer {self.name!r} (scale_mode={mode!r}) takes its range from each "
                             "tensor it quantizes; use 'fixed', 'running' or 'learned' for a static scale")
        if mode == "learned":
            if not self.step_ready:
                raise RuntimeError(f"Quantizer {self.name!r} (scale_mode='learned') has no step yet; "
                                   "run a forward first")
            return self.learned_inv(dtype), np.zeros(self.n_scales, dtype=dtype)
        if mode == "running":
            if not self.calibrated:
                raise RuntimeError(f"Quantizer {self.name!r} (scale_mode='running') has no calibrated range; "
                                   "run forward(x, training=True) on some batches first "
                                   "(or qs4d_np.train.ptq.calibrate)")
            lo, hi = self.buffers["running_lo"], self.buffers["running_hi"]
        else:
            lo, hi = self.spec.fixed_range(self.fixed_range, SimpleNamespace(channels=self.n_scales, G=1))
        return self.spec.scales(lo, hi, dtype)

    def frozen(self, dtype: np.dtype) -> FrozenQuant:
        """This quantizer with its static range frozen, for streaming values (..., channels) in
        ``dtype`` (``quant.frozen``); raises like ``static_scales`` for a data-dependent, an
        uncalibrated ``running`` or an unset ``learned`` range."""
        return FrozenQuant.of(self.spec, *self.static_scales(dtype), self.name, np.dtype(dtype), True)

    def learned_inv(self, dtype: np.dtype) -> np.ndarray:
        """inv = 1/step (n_scales,) in ``dtype``, the step floored at min_range/qpos (learned mode)."""
        floor = self.spec.min_range / self.spec.code_grid.qpos
        return (1.0 / np.maximum(self._params["step"].astype(np.float64), floor)).astype(dtype)

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        training = check_bool("training", training)
        lay, inv, zp = self._scales(x, training)
        out, state = self.spec.apply(x, lay, inv, zp, name=self.name)
        self._cache = (x, state)
        return out

    def quantize(self, x: np.ndarray) -> QuantTensor:
        """Integer codes of ``x`` as an evaluation forward would quantize it (no cache, no range update)."""
        lay, inv, zp = self._scales(x, training=False)
        return self.spec.apply(x, lay, inv, zp, want_codes=True, name=self.name)[1].tensor()

    def backward(self, grad: np.ndarray) -> np.ndarray:
        x, state = self._saved()
        learned = self.scale_mode == "learned"
        dx, dstep = ste_backward(grad, x, state, self.ste, want_step=learned)
        if learned:
            g = 1.0
            if self.lsq_grad_scale:
                g = lsq_grad_scale(state.layout.per_channel_count, self.spec.code_grid.qpos)
            self._grads["step"] = (dstep * g).astype(self.dtype)
        return dx

    def last_state(self) -> QuantState:
        """The (inv, zp, layout) used by the last forward (for export and tests)."""
        return self._saved()[1]
