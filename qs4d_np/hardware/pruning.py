"""Pruning an S4D model: the QS4D reference's greedy protocol, structured greedy, magnitude.

``prune(model, x_val, y_val, method, tolerance=...)`` is the entry point (``PruneResult``);
``qs4d prune`` (``qs4d_np/cli/prune.py``) runs it on a checkpoint. Accuracies are fractions in
[0, 1] and ``tolerance`` is one too: ``tolerance=0.01`` is the paper's 1 point (the CLI's
``--tolerance`` is in points: 1.0). The rule "keep iff accuracy >= baseline - tolerance" is
decided on counts of correct validation samples: keep iff correct >= base_correct -
floor(tolerance * n), which is the same rule without float ties.

Methods
-------
``"qs4d"``: the reference's protocol (``param_prune.py`` of the QS4D code; SPEC section 2).
The reference loads the trained model, takes its accuracy as the baseline, then walks the
state dict in order and, for every tensor of an S4D layer (``s4_layers.*``: ``D``,
``kernel.C`` (stored as (H, N/2, 2) reals), ``kernel.log_dt``, ``kernel.log_A_real``,
``kernel.A_imag``, the mixing ``output_linear`` weight and bias), every single element in
index order: it sets the element to 0, evaluates, keeps the zero when the accuracy is >=
baseline - 1 point and puts the value back otherwise. Zeros accumulate (each try sees the
zeros kept before it); the baseline stays the unpruned accuracy; the loss plays no part;
each element is tried exactly once. It scores on the test split.

What is the same here: the one-pass greedy over units in a fixed order, the cumulative
zeros, the fixed baseline, the accuracy-only rule with its tolerance, the stored parameter
itself set to 0 (so a zero ``log_A_real`` means A_real = -1 and a zero ``log_dt`` means
dt = 1, as in the reference; for a QAT model the float weight is zeroed and the quantizer
sees the zero), and the model's own forward (its training mode: a recurrent-QAT model is
evaluated in recurrent mode, with its per-batch activation ranges; ``mode=`` overrides).
What differs, and why:

* Validation split instead of test (the test split only reports).
* The unit. The paper reports "the fraction of a layer's kernels" pruned, in multiples of
  1/64 (e.g. 53.125% vs 39.063%): a kernel K_h = 2 Re(sum_n C[h, n] Bbar Abar^l) belongs to
  one channel h, and it is gone exactly when its row C[h, :] is zero. One evaluation per
  scalar (4 x 64 channels x 32 modes x 2 parts of C alone: 16,384 evaluations, and more for
  the other tensors) costs days here (one validation pass of a 4 x 64 sMNIST model is
  seconds), so the default unit is the row of channel h (``unit="row"``): one try zeroes
  C[h, :], i.e. removes kernel h; the per-layer fraction is then a multiple of 1/H by
  construction. ``tensors`` adds the reference's other tensors, again by channel rows
  (``D[h]``, ``log_dt[h]``, ``log_A_real[h, :]``, ``A_imag[h, :]``, and the mixing weight's
  row h, i.e. channel h's input to the mixing; the mixing bias has no channel axis and is
  tried per element), in the reference's order D, C, log_dt, log_A_real, A_imag, mixing
  weight, mixing bias. ``unit="element"`` tries single entries as the reference does (a
  complex entry of C, i.e. one mode, counts as one element: the reference zeroes its real
  and imaginary parts in two tries), affordable only for tiny models.
* Order: layers 0 .. n-1; in a layer the tensors in the order above; in a tensor the rows
  (or elements, row-major) by ascending index. The reference's order, fixed, no scores.
* Cost: each try re-runs only the blocks from the changed layer on (the input of that
  layer is computed once per layer: earlier layers are final by then), and stops as soon
  as the decision is certain (enough correct samples to keep, or too few left to reach
  the threshold). Both are exact: the decision equals that of a full evaluation (the
  model's ``forward`` is ``forward_from(forward_to(x, k), k)`` bit for bit, batches fixed).
  A try whose forward goes non-finite counts its batch as wrong.

``"modes"`` / ``"channels"``: structured greedy (``prune_greedy``) under the same rule: chunks
of the lowest-scoring remaining modes / channels, one chunk at a time in the layer whose
chunk costs the least validation loss. ``"magnitude"``: ``prune_magnitude`` at ``sparsity``
(no validation decides; the accuracies are measured).

Units of the structured methods (``granularity``; layer i of the model):

* ``"mode"``: a complex mode (h, m) of ``layers.i.ssm.C``. Pruned means C[h, m] = 0.
* ``"channel"``: channel h of layer i's S4D path: C[h, :] = 0, D[h] = 0 and
  row h of the mixing weight (``layers.i.ssm.mixing.linear.weight[h, :]``,
  the mixing input of that channel) = 0, so the channel's SSM output and its
  whole contribution to the mixing are exactly zero.
* ``"weight"``: single entries of the analog matrices: ``encoder.weight``,
  ``decoder.weight``, every ``mixing.linear.weight`` and the entries of C
  (an entry of C is one mode).

Reported per layer (``layer_report``): the kernels pruned (rows of C all zero) as a count and
a fraction of H, every masked tensor's pruned elements, and its fully pruned rows as a
fraction of H.

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

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from qs4d_np.core.checks import NonFiniteError, check_choice, check_float, check_int, check_labeled
from qs4d_np.core.loss import SoftmaxCrossEntropy
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.ssm.s4d import S4D

GRANULARITIES = ("mode", "channel", "weight")
METHODS = ("qs4d", "modes", "channels", "magnitude")
UNITS = ("row", "element")
# The S4D-layer tensors the reference prunes, in its (state dict) order, under our names; the
# discrete parameterization's tensors and a learned B take the places of the ones they replace.
QS4D_TENSORS = ("D", "C", "B", "Bbar", "log_dt", "log_A_real", "A_imag", "Abar_rho", "Abar_theta",
                "mixing.linear.weight", "mixing.linear.bias")


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


def _ssm_layers(model: S4DModel) -> list[tuple[str, S4D]]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"model must be an S4DModel (with .blocks), got {type(model).__name__}")
    return [(f"layers.{i}", block.ssm) for i, block in enumerate(blocks)]


def _groups(model: S4DModel, granularity: str) -> list[_Group]:
    groups = []
    if granularity == "weight":
        for name, value in model.params.items():
            if name in ("encoder.weight", "decoder.weight") or name.endswith(("mixing.linear.weight", "ssm.C")):
                def zero(masks, idx, name=name):
                    masks[name].reshape(-1)[idx] = False
                groups.append(_Group(name, np.abs(value).astype(np.float64).reshape(-1), zero))
        return groups
    for prefix, ssm in _ssm_layers(model):
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


def _empty_masks(model: S4DModel, granularity: str) -> PruneMasks:
    layers = _ssm_layers(model)
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


def _order(group: _Group) -> np.ndarray:
    # stable: equal scores are pruned in index order, so results do not depend on the sort algorithm
    return np.argsort(group.scores, kind="stable")


# -- magnitude ----------------------------------------------------------------
def prune_magnitude(model: S4DModel, sparsity: float, granularity: str = "mode") -> PruneMasks:
    """Masks removing floor(sparsity * units) lowest-scoring units of every layer (tensor for "weight").

    The model is not changed; call ``masks.apply(model)``.
    """
    sparsity = check_float("sparsity", sparsity, min_value=0.0, max_value=1.0)
    check_choice("granularity", granularity, GRANULARITIES)
    masks = _empty_masks(model, granularity)
    for group in _groups(model, granularity):
        n = group.scores.size
        k = int(np.floor(sparsity * n + 1e-9))  # 1e-9: 0.25 * 64 must give 16 despite float rounding
        group.zero(masks.masks, _order(group)[:k])
        masks.pruned[group.name] = k
        masks.total[group.name] = n
    return masks


# -- greedy -------------------------------------------------------------------
def _min_correct(base_correct: int, n: int, tolerance: float) -> int:
    """Fewest correct samples a kept zero may leave: acc >= base - tolerance on counts (module doc)."""
    return base_correct - int(math.floor(tolerance * n + 1e-9))  # 1e-9: 0.01 * 300 must allow 3


def _loss_and_correct(model: S4DModel, x: np.ndarray, y: np.ndarray, batch_size: int,
                      mode: str | None = None) -> tuple[float, int]:
    loss_fn = SoftmaxCrossEntropy()
    loss, correct = 0.0, 0
    for lo in range(0, x.shape[0], batch_size):
        logits = model.forward(x[lo:lo + batch_size], training=False, mode=mode)
        yb = y[lo:lo + batch_size]
        loss += loss_fn.forward(logits, yb) * len(yb)
        correct += int(np.count_nonzero(np.argmax(logits, axis=1) == yb))
    return loss / x.shape[0], correct


def _check_split(model: S4DModel, x_val: np.ndarray, y_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return check_labeled("x_val", x_val, "y_val", y_val, model.d_input, model.d_output)


def prune_greedy(model: S4DModel, x_val: np.ndarray, y_val: np.ndarray, *, tolerance: float = 0.01,
                 granularity: str = "mode", chunk: float = 1 / 16, batch_size: int = 256,
                 max_sparsity: float = 1.0, mode: str | None = None) -> tuple[PruneMasks, dict[str, Any]]:
    """Greedy per-layer pruning under an accuracy budget (see the module docstring).

    Each round tries, in every group, removing its next ``ceil(chunk * units)``
    lowest-scoring units, keeps the try with the lowest validation loss when
    its accuracy is >= base accuracy - ``tolerance`` (on counts, module doc), and stops
    when no group passes (or every group reached ``max_sparsity``). The model's parameters
    are restored on return; apply the masks to keep the result. Returns the
    masks and a record: base and final accuracy, evaluations made, and the
    accepted steps.
    """
    tolerance = check_float("tolerance", tolerance, min_value=0.0, max_value=1.0)
    chunk = check_float("chunk", chunk, min_value=0.0, max_value=1.0, min_inclusive=False)
    max_sparsity = check_float("max_sparsity", max_sparsity, min_value=0.0, max_value=1.0)
    check_choice("granularity", granularity, GRANULARITIES)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    x_val, y_val = _check_split(model, x_val, y_val)
    n_val = x_val.shape[0]

    groups = _groups(model, granularity)
    masks = _empty_masks(model, granularity)
    orders = {g.name: _order(g) for g in groups}
    done = {g.name: 0 for g in groups}
    original = {n: model.params[n].copy() for n in masks.masks}
    _, base_correct = _loss_and_correct(model, x_val, y_val, batch_size, mode)
    min_correct = _min_correct(base_correct, n_val, tolerance)
    record: dict[str, Any] = {"base_accuracy": base_correct / n_val, "accuracy": base_correct / n_val,
                              "evaluations": 1, "steps": []}
    try:
        while True:
            best = None
            for g in groups:
                n = g.scores.size
                step = max(1, int(np.ceil(chunk * n)))
                k = min(n, done[g.name] + step)
                if k == done[g.name] or k > max_sparsity * n + 1e-9:
                    continue
                trial = PruneMasks(granularity, {name: m.copy() for name, m in masks.masks.items()})
                g.zero(trial.masks, orders[g.name][:k])
                _restore(model, original)
                trial.apply(model)
                try:
                    loss, correct = _loss_and_correct(model, x_val, y_val, batch_size, mode)
                except NonFiniteError:  # a try that breaks the forward is not kept
                    loss, correct = math.inf, -1
                record["evaluations"] += 1
                if correct >= min_correct and (best is None or loss < best[0]):
                    best = (loss, correct / n_val, g.name, k, trial)
            if best is None:
                break
            loss, acc, name, k, trial = best
            masks.masks = trial.masks
            done[name] = k
            record["accuracy"] = acc
            record["steps"].append({"group": name, "pruned": k, "loss": loss, "accuracy": acc})
    finally:
        _restore(model, original)
    masks.pruned = dict(done)
    masks.total = {g.name: g.scores.size for g in groups}
    return masks, record


def _restore(model: S4DModel, original: dict[str, np.ndarray]) -> None:
    params = model.params
    for name, value in original.items():
        params[name][...] = value


# -- the reference's protocol ("qs4d") ------------------------------------------------
class _Evaluator:
    """Correct counts of a model on fixed validation batches, re-running only blocks >= ``layer``.

    ``at(layer)`` computes (once) the input of block ``layer`` for every batch with the current
    parameters; ``decide(min_correct)`` then runs blocks ``layer`` .. n-1 batch by batch and
    stops once ``correct >= min_correct`` is certain either way. Exact: ``S4DModel.forward`` is
    ``forward_from(forward_to(x, k), k)``, and the batches are always the same.
    """

    def __init__(self, model: S4DModel, x: np.ndarray, y: np.ndarray, batch_size: int, mode: str) -> None:
        self.model, self.x, self.y, self.mode = model, x, y, mode
        self.bounds = [(lo, min(lo + batch_size, x.shape[0])) for lo in range(0, x.shape[0], batch_size)]
        self.layer = 0
        self.inputs: list[np.ndarray] | None = None
        self.evaluations = 0

    def at(self, layer: int) -> None:
        self.layer = layer
        self.inputs = [self.model.forward_to(self.x[lo:hi], layer, mode=self.mode) for lo, hi in self.bounds]

    def decide(self, min_correct: int | None = None) -> tuple[int, int]:
        """(correct, samples seen); without ``min_correct`` every batch is run."""
        assert self.inputs is not None, "at(layer) first"
        n = self.x.shape[0]
        correct = seen = 0
        self.evaluations += 1
        for (lo, hi), h in zip(self.bounds, self.inputs):
            try:
                logits = self.model.forward_from(h, self.layer, mode=self.mode)
                correct += int(np.count_nonzero(np.argmax(logits, axis=1) == self.y[lo:hi]))
            except NonFiniteError:  # the batch counts as wrong
                pass
            seen += hi - lo
            if min_correct is not None and (correct >= min_correct or correct + (n - seen) < min_correct):
                break
        return correct, seen


def _qs4d_units(model: S4DModel, layer: int, tensors: Sequence[str], unit: str
                ) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(parameter name, tensor name, index) of every unit of ``layer``, in the documented order."""
    params = model.params
    H = model.config["d_model"]
    for tensor in QS4D_TENSORS:
        name = f"layers.{layer}.ssm.{tensor}"
        if tensor not in tensors or name not in params:
            continue
        shape = params[name].shape
        if unit == "row" and shape[0] == H:
            for h in range(H):
                yield name, tensor, (h,)
        else:
            for index in np.ndindex(*shape):
                yield name, tensor, tuple(int(i) for i in index)


def _check_tensors(model: S4DModel, tensors: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tensors, str):
        tensors = (tensors,)
    tensors = tuple(tensors)
    if not tensors:
        raise ValueError("tensors must name at least one S4D-layer tensor, got none")
    present = [t for t in QS4D_TENSORS if f"layers.0.ssm.{t}" in model.params]
    for t in tensors:
        if t not in present:
            raise ValueError(f"tensors: {t!r} is not a tensor of this model's S4D layers; expected some of "
                             f"{present}")
    return tensors


def prune_qs4d(model: S4DModel, x_val: np.ndarray, y_val: np.ndarray, *, tolerance: float = 0.01,
               tensors: Sequence[str] = ("C",), unit: str = "row", batch_size: int = 100,
               mode: str | None = None, progress: bool = False) -> tuple[PruneMasks, dict[str, Any]]:
    """The reference's greedy one-pass pruning (module docstring: order, unit, exactness).

    Returns the masks (groups: ``layers.i``, units tried / kept zero) and a record: base and
    final validation accuracy, evaluations, and every try in order
    (``{"tensor", "index", "kept", "correct", "seen"}``; ``seen`` < samples when the decision
    came early). The model is restored on return. ``progress``: one line per layer on stderr.
    """
    tolerance = check_float("tolerance", tolerance, min_value=0.0, max_value=1.0)
    check_choice("unit", unit, UNITS)
    tensors = _check_tensors(model, tensors)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    x_val, y_val = _check_split(model, x_val, y_val)
    mode = model.mode if mode is None else mode
    n_val = x_val.shape[0]
    params = model.params
    masks = PruneMasks(f"qs4d-{unit}")
    original = {}
    for layer in range(len(_ssm_layers(model))):
        for name, _, _ in _qs4d_units(model, layer, tensors, unit):
            if name not in masks.masks:
                masks.masks[name] = np.ones(params[name].shape, dtype=bool)
                original[name] = params[name].copy()
    evaluator = _Evaluator(model, x_val, y_val, batch_size, mode)
    evaluator.at(0)
    base_correct, _ = evaluator.decide()
    min_correct = _min_correct(base_correct, n_val, tolerance)
    tries: list[dict[str, Any]] = []
    try:
        for layer in range(len(_ssm_layers(model))):
            evaluator.at(layer)  # layers < layer are final from here on
            group = f"layers.{layer}"
            masks.total[group] = masks.pruned[group] = 0
            for name, tensor, index in _qs4d_units(model, layer, tensors, unit):
                value = params[name][index].copy()
                params[name][index] = 0
                correct, seen = evaluator.decide(min_correct)
                kept = correct >= min_correct
                if kept:
                    masks.masks[name][index] = False
                else:
                    params[name][index] = value
                masks.total[group] += 1
                masks.pruned[group] += int(kept)
                tries.append({"tensor": name, "index": list(index), "kept": kept, "correct": correct, "seen": seen})
            if progress:
                print(f"prune qs4d: {group}: {masks.pruned[group]} of {masks.total[group]} units zeroed "
                      f"({evaluator.evaluations} evaluations so far)", file=sys.stderr, flush=True)
        evaluator.at(0)
        final_correct, _ = evaluator.decide()
    finally:
        _restore(model, original)
    return masks, {"base_accuracy": base_correct / n_val, "accuracy": final_correct / n_val,
                   "evaluations": evaluator.evaluations, "tries": tries}


# -- reports and the entry point ---------------------------------------------------------
def layer_report(model: S4DModel, masks: PruneMasks) -> list[dict[str, Any]]:
    """Per S4D layer: kernels pruned (C[h, :] all pruned) of H, and per masked tensor of the layer
    its pruned elements and fully pruned rows (channel-indexed tensors: a fraction of H)."""
    H = model.config["d_model"]
    out = []
    for prefix, _ in _ssm_layers(model):
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
    _ssm_layers(model)
    start = time.perf_counter()
    mode = model.mode if mode is None else mode
    batch_size = check_int("batch_size", batch_size, min_value=1)
    settings: dict[str, Any] = {"batch_size": batch_size}
    if method == "magnitude":
        if sparsity is None:
            raise ValueError("method 'magnitude' needs sparsity (a fraction in [0, 1]), got None")
        masks = prune_magnitude(model, sparsity, granularity)
        x_val, y_val = _check_split(model, x_val, y_val)
        original = {n: model.params[n].copy() for n in masks.masks}
        try:
            base = _loss_and_correct(model, x_val, y_val, batch_size, mode)[1]
            masks.apply(model)
            final = _loss_and_correct(model, x_val, y_val, batch_size, mode)[1]
        finally:
            _restore(model, original)
        record = {"base_accuracy": base / len(y_val), "accuracy": final / len(y_val), "evaluations": 2}
        settings.update(sparsity=sparsity, granularity=granularity)
        tolerance_used = None
    elif method == "qs4d":
        masks, record = prune_qs4d(model, x_val, y_val, tolerance=tolerance, tensors=tensors, unit=unit,
                                   batch_size=batch_size, mode=mode, progress=progress)
        settings.update(tensors=list(_check_tensors(model, tensors)), unit=unit)
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
