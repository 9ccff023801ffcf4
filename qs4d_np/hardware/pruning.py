"""Pruning an S4D model: the QS4D reference's greedy protocol, structured greedy, magnitude.

``prune(model, x_val, y_val, method, tolerance=...)`` is the entry point (``PruneResult``);
``qs4d prune`` (``qs4d_np/cli/prune.py``) runs it on a checkpoint. Accuracies are fractions in
[0, 1] and ``tolerance`` is one too: ``tolerance=0.01`` is the paper's 1 point (the CLI's
``--tolerance`` is in points: 1.0).

Methods (``METHODS``): "qs4d" (``prune_qs4d``) and "modes" / "channels" (``prune_greedy``) are
the searches of ``qs4d_np.hardware.pruning_search``, which describes their rule, order and cost;
"magnitude" is ``prune_magnitude`` of ``qs4d_np.hardware.pruning_masks``, which describes the
units, their scores, the masks and the drop-out rule the metrics, the IMSSA mapping and the
golden export follow.

Reported per layer (``layer_report``): the kernels pruned (rows of C all zero) as a count and
a fraction of H, every masked tensor's pruned elements, and its fully pruned rows as a
fraction of H.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from qs4d_np.core.checks import check_choice, check_int
from qs4d_np.hardware.pruning_masks import (GRANULARITIES, MaskedModel, PruneMasks, mode_scores, prune_magnitude,
                                            ssm_layers)
from qs4d_np.hardware.pruning_search import (QS4D_TENSORS, UNITS, check_split, check_tensors, loss_and_correct,
                                             prune_greedy, prune_qs4d, restore_params)
from qs4d_np.models.s4d_model import S4DModel

# The masks and the searches lived in this module before pruning_masks and pruning_search: their
# public names are still importable from here.
__all__ = ["METHODS", "PruneResult", "layer_report", "prune",
           "GRANULARITIES", "QS4D_TENSORS", "UNITS", "MaskedModel", "PruneMasks", "mode_scores", "prune_greedy",
           "prune_magnitude", "prune_qs4d"]

METHODS = ("qs4d", "modes", "channels", "magnitude")


# -- reports and the entry point ---------------------------------------------------------
def layer_report(model: S4DModel, masks: PruneMasks) -> list[dict[str, Any]]:
    """Per S4D layer: kernels pruned (C[h, :] all pruned) of H, and per masked tensor of the layer
    its pruned elements and fully pruned rows (channel-indexed tensors: a fraction of H)."""
    H = model.config["d_model"]
    out = []
    for prefix, _ in ssm_layers(model):
        C = masks.masks.get(f"{prefix}.ssm.C")
        kernels = 0 if C is None else int(np.count_nonzero(~C.any(axis=1)))
        tensors = {}
        for name, keep in masks.masks.items():
            if not name.startswith(prefix + "."):
                continue
            pruned = int(keep.size - np.count_nonzero(keep))
            entry: dict[str, Any] = {"elements": int(keep.size), "pruned": pruned, "fraction": pruned / keep.size}
            if keep.shape[0] == H:
                rows = int(np.count_nonzero(~keep.reshape(H, -1).any(axis=1)))
                entry.update(rows_pruned=rows, row_fraction=rows / H)
            tensors[name[len(prefix) + 1:]] = entry
        out.append({"layer": prefix, "H": H, "kernels_pruned": kernels, "kernel_fraction": kernels / H,
                    "tensors": tensors})
    return out


@dataclass
class PruneResult:
    """What ``prune`` found. Accuracies are validation fractions; ``masks`` are not applied yet.

    ``layers``: ``layer_report`` (kernels pruned of H, per-tensor fractions); ``tensors``: every
    masked tensor's pruned fraction of elements; ``record``: the method's own record (tries of
    "qs4d", accepted steps of the structured greedy).
    """

    method: str
    masks: PruneMasks
    tolerance: float | None
    base_accuracy: float
    accuracy: float
    evaluations: int
    seconds: float
    samples: int
    mode: str
    layers: list[dict[str, Any]]
    tensors: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    def apply(self, model: S4DModel) -> None:
        """Zero the pruned entries of ``model`` in place."""
        self.masks.apply(model)

    def masked(self, model: S4DModel) -> MaskedModel:
        """``model`` pruned and wrapped for fine-tuning (pruned entries stay exactly zero)."""
        return MaskedModel(model, self.masks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: everything but the masks themselves (their counts are in ``layers``)."""
        return {"method": self.method, "tolerance": self.tolerance, "base_val_accuracy": self.base_accuracy,
                "val_accuracy": self.accuracy, "evaluations": self.evaluations, "seconds": self.seconds,
                "val_samples": self.samples, "mode": self.mode, "sparsity": self.masks.sparsity,
                "unit_fractions": self.masks.fractions(), "layers": self.layers, "tensors": self.tensors,
                "settings": self.settings, "record": self.record}


def prune(model: S4DModel, x_val: np.ndarray, y_val: np.ndarray, method: str = "qs4d", *,
          tolerance: float = 0.01, tensors: Sequence[str] = ("C",), unit: str = "row",
          sparsity: float | None = None, granularity: str = "mode", chunk: float = 1 / 16,
          batch_size: int = 100, mode: str | None = None, progress: bool = False) -> PruneResult:
    """Prune ``model`` with ``method`` (``METHODS``; module docstring) on the validation split.

    ``tolerance``: accuracy drop allowed, a fraction (0.01 = 1 point; not for "magnitude").
    "qs4d": ``tensors`` (some of ``QS4D_TENSORS``; default C, i.e. the kernels) and ``unit``
    ("row": channel rows, "element": single entries). "modes" / "channels": ``chunk`` (the
    greedy step, a fraction of a layer's units). "magnitude": ``sparsity`` in [0, 1] and
    ``granularity`` ("mode", "channel", "weight"). ``batch_size`` is the evaluation batch
    (quantized activations take their ranges per batch); ``mode`` defaults to the model's.
    The model is unchanged on return: ``result.apply(model)`` prunes it.
    """
    check_choice("method", method, METHODS)
    ssm_layers(model)
    start = time.perf_counter()
    mode = model.mode if mode is None else mode
    batch_size = check_int("batch_size", batch_size, min_value=1)
    settings: dict[str, Any] = {"batch_size": batch_size}
    if method == "magnitude":
        if sparsity is None:
            raise ValueError("method 'magnitude' needs sparsity (a fraction in [0, 1]), got None")
        masks = prune_magnitude(model, sparsity, granularity)
        x_val, y_val = check_split(model, x_val, y_val)
        original = {n: model.params[n].copy() for n in masks.masks}
        try:
            base = loss_and_correct(model, x_val, y_val, batch_size, mode)[1]
            masks.apply(model)
            final = loss_and_correct(model, x_val, y_val, batch_size, mode)[1]
        finally:
            restore_params(model, original)
        record = {"base_accuracy": base / len(y_val), "accuracy": final / len(y_val), "evaluations": 2}
        settings.update(sparsity=sparsity, granularity=granularity)
        tolerance_used = None
    elif method == "qs4d":
        masks, record = prune_qs4d(model, x_val, y_val, tolerance=tolerance, tensors=tensors, unit=unit,
                                   batch_size=batch_size, mode=mode, progress=progress)
        settings.update(tensors=list(check_tensors(model, tensors)), unit=unit)
        tolerance_used = tolerance
    else:
        granularity = "mode" if method == "modes" else "channel"
        masks, record = prune_greedy(model, x_val, y_val, tolerance=tolerance, granularity=granularity,
                                     chunk=chunk, batch_size=batch_size, mode=mode)
        settings.update(granularity=granularity, chunk=chunk)
        tolerance_used = tolerance
    extra = {k: v for k, v in record.items() if k not in ("base_accuracy", "accuracy", "evaluations")}
    return PruneResult(method=method, masks=masks, tolerance=tolerance_used, base_accuracy=record["base_accuracy"],
                       accuracy=record["accuracy"], evaluations=record["evaluations"],
                       seconds=time.perf_counter() - start, samples=int(len(y_val)), mode=mode,
                       layers=layer_report(model, masks),
                       tensors={n: float(1 - np.count_nonzero(k) / k.size) for n, k in masks.masks.items()},
                       settings=settings, record=extra)
