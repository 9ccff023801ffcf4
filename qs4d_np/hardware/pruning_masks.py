"""Pruning masks and the units they remove: the structured units, their scores, magnitude pruning.

Units of the structured methods (``granularity``; layer i of the model):

* ``"mode"``: a complex mode (h, m) of ``layers.i.ssm.C``. Pruned means C[h, m] = 0.
* ``"channel"``: channel h of layer i's S4D path: C[h, :] = 0, D[h] = 0 and
  row h of the mixing weight (``layers.i.ssm.mixing.linear.weight[h, :]``,
  the mixing input of that channel) = 0, so the channel's SSM output and its
  whole contribution to the mixing are exactly zero.
* ``"weight"``: single entries of the analog matrices: ``encoder.weight``,
  ``decoder.weight``, every ``mixing.linear.weight`` and the entries of C
  (an entry of C is one mode).

The drop-out rule (what the metrics, the IMSSA mapping and a golden export
use): a mode (h, m) with C[h, m] == 0 is not mapped (its state never reaches
an output); a channel is mapped iff it keeps a mode or D[h] != 0; a row or a
column of a Linear weight that is all zero is not mapped. Zeros are exact
(masks are applied by multiplication with 0/1), so ``== 0`` tests are safe.

Importance (for magnitude pruning): a mode's contribution to the kernel,
K_hm[l] = 2Re(C Bbar Abar^l), has l2 norm of order |C*Bbar| / sqrt(1 - |Abar|^2)
(the norm of the complex impulse response over infinite length), which is
the score used; a channel scores sqrt(sum of its modes' scores^2 + D^2)
times the norm of its mixing row (1 without mixing); a weight scores |w|.

``PruneMasks`` keeps the masks; ``MaskedModel`` wraps a model for fine-tuning so that pruned
parts stay exactly zero (masks applied before each forward, masked gradients zeroed after
each backward; with AdamW a parameter whose gradient is always 0 and whose value is 0 never
moves: zero moments, zero decay).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from qs4d_np.core.checks import check_choice, check_float
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.ssm.s4d import S4D

GRANULARITIES = ("mode", "channel", "weight")


@dataclass
class PruneMasks:
    """Keep-masks (True = kept) by parameter name, plus the units pruned per group."""

    granularity: str
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    pruned: dict[str, int] = field(default_factory=dict)   # group -> units pruned
    total: dict[str, int] = field(default_factory=dict)    # group -> units

    def fractions(self) -> dict[str, float]:
        """Pruned fraction per group (layer for mode/channel, tensor for weight)."""
        return {g: self.pruned[g] / self.total[g] for g in self.total}

    @property
    def sparsity(self) -> float:
        """Pruned units over all units."""
        return sum(self.pruned.values()) / max(sum(self.total.values()), 1)

    def apply(self, model: S4DModel) -> None:
        """Zero the pruned entries of ``model``'s parameters in place."""
        params = model.params
        for name, keep in self.masks.items():
            if name not in params:
                raise ValueError(f"mask {name!r} names no parameter of the model")
            params[name] *= keep

    def mask_grads(self, grads: dict[str, np.ndarray]) -> None:
        """Zero the gradients of pruned entries in place (so fine-tuning cannot regrow them)."""
        for name, keep in self.masks.items():
            if name in grads:
                grads[name] *= keep


class MaskedModel:
    """Wraps a model so pruned parts stay zero during training; everything else is the model's."""

    def __init__(self, model: S4DModel, masks: PruneMasks) -> None:
        if not isinstance(masks, PruneMasks):
            raise TypeError(f"masks must be PruneMasks, got {type(masks).__name__}")
        self.model = model
        self.masks = masks
        masks.apply(model)

    def forward(self, x: np.ndarray, training: bool = False, **kw: Any) -> np.ndarray:
        self.masks.apply(self.model)
        return self.model.forward(x, training=training, **kw)

    def backward(self, grad: np.ndarray) -> np.ndarray:
        out = self.model.backward(grad)
        self.masks.mask_grads(self.model.grads)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


# -- units and scores ---------------------------------------------------------
@dataclass(frozen=True)
class _Group:
    """One group of units (a layer or a tensor): scores and how to zero unit k in a mask set."""

    name: str
    scores: np.ndarray  # (units,)
    zero: Callable[[dict[str, np.ndarray], np.ndarray], None]  # (masks, unit indices) -> None


def mode_scores(ssm: S4D) -> np.ndarray:
    """(H, M) score |C*Bbar| / sqrt(1 - |Abar|^2) of every mode of an S4D layer (module docstring)."""
    d = ssm.discrete()
    C = ssm.params["C"].astype(np.complex128)
    return np.abs(C * d.Bbar) / np.sqrt(np.maximum(1.0 - np.abs(d.Abar) ** 2, 1e-12))


def ssm_layers(model: S4DModel) -> list[tuple[str, S4D]]:
    """(``layers.i``, its S4D layer) for every block of ``model``; a TypeError for a model without blocks."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"model must be an S4DModel (with .blocks), got {type(model).__name__}")
    return [(f"layers.{i}", block.ssm) for i, block in enumerate(blocks)]


def unit_groups(model: S4DModel, granularity: str) -> list[_Group]:
    """The groups of ``granularity``'s units (per layer its modes or channels, per analog matrix its
    entries) with their scores (module docstring) and how to zero a unit in a mask set."""
    groups = []
    if granularity == "weight":
        for name, value in model.params.items():
            if name in ("encoder.weight", "decoder.weight") or name.endswith(("mixing.linear.weight", "ssm.C")):
                def zero(masks, idx, name=name):
                    masks[name].reshape(-1)[idx] = False
                groups.append(_Group(name, np.abs(value).astype(np.float64).reshape(-1), zero))
        return groups
    for prefix, ssm in ssm_layers(model):
        scores = mode_scores(ssm)
        if granularity == "mode":
            def zero(masks, idx, prefix=prefix):
                masks[f"{prefix}.ssm.C"].reshape(-1)[idx] = False
            groups.append(_Group(prefix, scores.reshape(-1), zero))
            continue
        D = ssm.params["D"].astype(np.float64)
        channel = np.sqrt((scores ** 2).sum(axis=1) + D ** 2)
        if ssm.mixing is not None:
            channel = channel * np.linalg.norm(ssm.params["mixing.linear.weight"].astype(np.float64), axis=1)

        def zero(masks, idx, prefix=prefix, mixing=ssm.mixing is not None):
            masks[f"{prefix}.ssm.C"][idx, :] = False
            masks[f"{prefix}.ssm.D"][idx] = False
            if mixing:
                masks[f"{prefix}.ssm.mixing.linear.weight"][idx, :] = False
        groups.append(_Group(prefix, channel, zero))
    return groups


def empty_masks(model: S4DModel, granularity: str) -> PruneMasks:
    """Keep-everything masks over every parameter pruning at ``granularity`` can zero."""
    layers = ssm_layers(model)
    params = model.params
    if granularity == "weight":
        names = [n for n in params if n in ("encoder.weight", "decoder.weight")
                 or n.endswith(("mixing.linear.weight", "ssm.C"))]
    else:
        names = []
        for prefix, ssm in layers:
            names.append(f"{prefix}.ssm.C")
            if granularity == "channel":
                names.append(f"{prefix}.ssm.D")
                if ssm.mixing is not None:
                    names.append(f"{prefix}.ssm.mixing.linear.weight")
    return PruneMasks(granularity, {n: np.ones(params[n].shape, dtype=bool) for n in names})


def prune_order(group: _Group) -> np.ndarray:
    """The unit indices of ``group``, lowest score (pruned first) first."""
    # stable: equal scores are pruned in index order, so results do not depend on the sort algorithm
    return np.argsort(group.scores, kind="stable")


# -- magnitude ----------------------------------------------------------------
def prune_magnitude(model: S4DModel, sparsity: float, granularity: str = "mode") -> PruneMasks:
    """Masks removing floor(sparsity * units) lowest-scoring units of every layer (tensor for "weight").

    The model is not changed; call ``masks.apply(model)``.
    """
    sparsity = check_float("sparsity", sparsity, min_value=0.0, max_value=1.0)
    check_choice("granularity", granularity, GRANULARITIES)
    masks = empty_masks(model, granularity)
    for group in unit_groups(model, granularity):
        n = group.scores.size
        k = int(np.floor(sparsity * n + 1e-9))  # 1e-9: 0.25 * 64 must give 16 despite float rounding
        group.zero(masks.masks, prune_order(group)[:k])
        masks.pruned[group.name] = k
        masks.total[group.name] = n
    return masks

