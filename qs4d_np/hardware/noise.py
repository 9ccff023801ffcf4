"""Transient Gaussian noise on the values a forward computes with (the QS4D protocol).

``with transient_noise(model, sigma, rng, protocol="qs4d", targets=("A",)):`` sets a
value perturbation (``qs4d_np.core.perturb``) on the model's ops for the block; every
forward inside (training or evaluation, conv or recurrent) then adds fresh noise to
the values it computes with, after their quantizer (a QAT model's fake-quant values),
so small noise is not rounded away. On exit the hooks are cleared; the parameters are
never written, so the model is bit for bit what it was (also after an exception).

Where the noise goes, by target (``TARGETS``):

| target | value (per layer unless noted) |
|---|---|
| ``A`` | conv mode, continuous: A = -exp(log_A_real) + i*A_imag after the A quantizer, before the discretization; recurrent mode (and both modes of a discrete / frozen Abar): Abar after the Abar quantizer |
| ``B`` | Bbar (after its quantizer in recurrent mode) |
| ``C`` | C after its quantizer |
| ``D`` | D (after its quantizer in recurrent mode) |
| ``dt`` | log_dt after its quantizer (dt = exp(.) stays positive); continuous Abar only |
| ``linear`` | the mixing weight (H, 2H) after its quantizer |
| ``coder`` | the encoder and decoder weights after their quantizer (biases stay clean) |

Real and imaginary parts are separate real tensors (a crossbar holds them in
separate cells; the reference's "Re(A) and Im(A) separately"). The std of the
noise on a real tensor w of one layer is ``sigma * (max(w) - min(w))`` (protocol
``"qs4d"``, the reference's) or ``sigma * max|w|`` (``"absmax"``), from the value of
that forward.

Draws: one ``rng.standard_normal(w.shape)`` per real tensor, in the order the forward
computes with them: encoder weight; per layer 0, 1, ...: log_dt, A or Abar (real part,
then imaginary part), C, Bbar, D (each real, then imaginary where complex), the mixing
weight; the decoder weight. A value is drawn for even when its std is 0 (a constant
tensor), so the stream does not depend on the values. Same seed, same draws.
``sigma = 0`` sets no hook and draws nothing: the outputs are the clean ones exactly.

Unstable values are left as drawn, as in the reference: a noisy Re(A) >= 0 or
|Abar| >= 1 is what a noisy array computes with, and clamping it would hide the
failure the study measures. In conv mode the kernel of a finite sequence stays
finite; in recurrent mode such a mode grows like |Abar|^L, bounded by a state clip
or quantizer if the model has one; if a forward overflows, the model's own check
raises ``NonFiniteError`` naming the layer (``robustness`` counts that batch as wrong).
Noise large enough to overflow exp(dt*A) itself (dt*Re(A) > ~700, far beyond any
swept level) fails the kernel's input check instead (a ValueError naming Abar).

The noise reaches the forward only: ``effective_ssm``, ``quantized_recurrent``,
``stream()`` and ``step()`` compute with the clean values. A model converted by
``to_analog`` is refused (its crossbars have their own read noise: protocol
``crossbar`` in ``robustness``).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from qs4d_np.core.checks import check_choice, check_float
from qs4d_np.core.linear import Linear
from qs4d_np.core.module import Module
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.ssm.core import S4DCore

TARGETS = ("A", "B", "C", "D", "dt", "linear", "coder")
PROTOCOLS = ("qs4d", "absmax")
# the core's value keys (ssm.params) each target perturbs
CORE_KEYS = {"A": frozenset({"A", "Abar"}), "B": frozenset({"B"}), "C": frozenset({"C"}),
             "D": frozenset({"D"}), "dt": frozenset({"dt"})}


@dataclass
class GaussianSource:
    """The noise of one ``transient_noise`` block: std ``sigma * scale`` per real tensor, from ``rng``.
    ``draws`` counts the real tensors drawn so far."""

    sigma: float
    protocol: str
    rng: np.random.Generator
    draws: int = 0

    def scale(self, w: np.ndarray) -> float:
        """The protocol's scale of one real float64 tensor (module docstring)."""
        if self.protocol == "qs4d":
            return float(w.max() - w.min())
        return float(np.max(np.abs(w)))

    def add(self, value: np.ndarray) -> np.ndarray:
        """``value`` + noise, a new array of its dtype; real and imaginary parts drawn separately (real first)."""
        parts = (value.real, value.imag) if np.iscomplexobj(value) else (value,)
        noisy = []
        for part in parts:
            w = part.astype(np.float64)
            noisy.append(w + self.sigma * self.scale(w) * self.rng.standard_normal(w.shape))
            self.draws += 1
        out = noisy[0] + 1j * noisy[1] if len(noisy) == 2 else noisy[0]
        return out.astype(value.dtype)


@dataclass(frozen=True)
class OpNoise:
    """The value perturbation of one op (``core.perturb.ValuePerturbation``): the op's ``keys`` get
    noise from the block's shared ``source``."""

    keys: frozenset[str]
    source: GaussianSource

    def wants(self, key: str) -> bool:
        return key in self.keys

    def perturb(self, key: str, value: np.ndarray) -> np.ndarray:
        return self.source.add(value)


@dataclass
class NoiseBlock:
    """What ``transient_noise`` yields: its settings, the ops it perturbs (dotted name -> keys) and
    its ``source`` (None when sigma = 0; ``draws`` counts the tensors drawn)."""

    sigma: float
    protocol: str
    targets: tuple[str, ...]
    sites: dict[str, frozenset[str]]
    source: GaussianSource | None = field(default=None)

    @property
    def draws(self) -> int:
        return 0 if self.source is None else self.source.draws


def _digital(op: Module, name: str, kind: type) -> Module:
    if type(op) is not kind:  # an analog part (to_analog) computes with its crossbar, not the hook
        raise TypeError(f"transient_noise needs a digital S4DModel; {name} is a {type(op).__name__} (a model "
                        "converted by to_analog has its own read noise: use the crossbar protocol)")
    return op


def noise_sites(model: S4DModel, targets: Sequence[str]) -> dict[str, tuple[Module, frozenset[str]]]:
    """The ops of ``model`` that ``targets`` reach: dotted name -> (op, its value keys), forward order.
    Raises ValueError for an unknown target or one the model does not have (``dt`` of a discrete /
    frozen Abar, ``linear`` without mixing), TypeError for an analog model."""
    if not isinstance(model, S4DModel):
        raise TypeError(f"model must be an S4DModel, got {type(model).__name__}")
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets:
        raise ValueError(f"targets must be a non-empty sequence of {list(TARGETS)}, got {targets!r}")
    targets = tuple(targets)
    for t in targets:
        check_choice("targets entry", t, TARGETS)
    sites: dict[str, tuple[Module, frozenset[str]]] = {}
    coder = frozenset({"weight"}) if "coder" in targets else frozenset()
    if coder:
        sites["encoder"] = (_digital(model.encoder, "encoder", Linear), coder)
    reached = set(targets) & {"coder"}
    for i, block in enumerate(model.blocks):
        layer = block.ssm
        core = _digital(layer.core, f"layers.{i}.ssm core", S4DCore)
        keys = [t for t in targets if t in CORE_KEYS and (t != "dt" or core.abar == "continuous")]
        if keys:
            sites[f"layers.{i}.ssm"] = (core, frozenset().union(*(CORE_KEYS[t] for t in keys)))
            reached.update(keys)
        if "linear" in targets and layer.mixing is not None:
            name = f"layers.{i}.ssm.mixing.linear"
            sites[name] = (_digital(layer.mixing.linear, name, Linear), frozenset({"weight"}))
            reached.add("linear")
    if coder:
        sites["decoder"] = (_digital(model.decoder, "decoder", Linear), coder)
    missing = [t for t in targets if t not in reached]
    if missing:
        why = {"dt": "its layers learn Abar directly (abar='discrete' / 'frozen')", "linear": "it has no mixing"}
        raise ValueError(f"targets entry {missing[0]!r}: the model has no such value ({why[missing[0]]}); "
                         f"targets it has: {[t for t in TARGETS if t not in why or t in reached]}")
    return sites


@contextmanager
def transient_noise(model: S4DModel, sigma: float, rng: np.random.Generator, protocol: str = "qs4d",
                    targets: Sequence[str] = ("A",)) -> Iterator[NoiseBlock]:
    """Inside, every forward of ``model`` computes with freshly noised values of ``targets`` (module
    docstring); yields the ``NoiseBlock``. Backward: straight through (the noise is a constant of its
    forward). Raises ValueError for sigma < 0 or NaN, an unknown protocol or target, a target the model
    lacks, or a block nested in another on the same model; TypeError for an rng that is not a Generator."""
    sigma = check_float("sigma", sigma, min_value=0.0)
    check_choice("protocol", protocol, PROTOCOLS)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    sites = noise_sites(model, targets)
    for name, (op, _) in sites.items():
        if op.perturbation is not None:
            raise ValueError(f"{name} already has a value perturbation: transient_noise blocks on one model "
                             "do not nest")
    block = NoiseBlock(sigma, protocol, tuple(targets), {name: keys for name, (_, keys) in sites.items()})
    if sigma == 0.0:
        yield block
        return
    block.source = GaussianSource(sigma, protocol, rng)
    try:
        for op, keys in sites.values():
            op.perturbation = OpNoise(keys, block.source)
        yield block
    finally:
        for op, _ in sites.values():
            op.perturbation = None
