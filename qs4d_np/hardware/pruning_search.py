"""The pruning searches a validation split decides: the QS4D reference's greedy protocol
(``prune_qs4d``) and structured greedy (``prune_greedy``); ``qs4d_np.hardware.pruning.prune``
runs them. The rule "keep iff accuracy >= baseline - tolerance" (both fractions) is
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
"""
from __future__ import annotations

import math
import sys
from typing import Any, Iterator, Sequence

import numpy as np

from qs4d_np.core.checks import NonFiniteError, check_choice, check_float, check_int, check_labeled
from qs4d_np.core.loss import SoftmaxCrossEntropy
from qs4d_np.hardware.pruning_masks import (GRANULARITIES, PruneMasks, empty_masks, prune_order, ssm_layers,
                                            unit_groups)
from qs4d_np.models.s4d_model import S4DModel

UNITS = ("row", "element")
# The S4D-layer tensors the reference prunes, in its (state dict) order, under our names; the
# discrete parameterization's tensors and a learned B take the places of the ones they replace.
QS4D_TENSORS = ("D", "C", "B", "Bbar", "log_dt", "log_A_real", "A_imag", "Abar_rho", "Abar_theta",
                "mixing.linear.weight", "mixing.linear.bias")


# -- greedy -------------------------------------------------------------------
def _min_correct(base_correct: int, n: int, tolerance: float) -> int:
    """Fewest correct samples a kept zero may leave: acc >= base - tolerance on counts (module doc)."""
    return base_correct - int(math.floor(tolerance * n + 1e-9))  # 1e-9: 0.01 * 300 must allow 3


def loss_and_correct(model: S4DModel, x: np.ndarray, y: np.ndarray, batch_size: int,
                     mode: str | None = None) -> tuple[float, int]:
    """(mean cross-entropy, correct count) of ``model`` in eval mode over ``x``, ``y`` in batches of
    ``batch_size`` (``mode``: passed to the forward)."""
    loss_fn = SoftmaxCrossEntropy()
    loss, correct = 0.0, 0
    for lo in range(0, x.shape[0], batch_size):
        logits = model.forward(x[lo:lo + batch_size], training=False, mode=mode)
        yb = y[lo:lo + batch_size]
        loss += loss_fn.forward(logits, yb) * len(yb)
        correct += int(np.count_nonzero(np.argmax(logits, axis=1) == yb))
    return loss / x.shape[0], correct


def check_split(model: S4DModel, x_val: np.ndarray, y_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x_val``, ``y_val`` checked as a labeled split of the model's input and classes."""
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
    x_val, y_val = check_split(model, x_val, y_val)
    n_val = x_val.shape[0]

    groups = unit_groups(model, granularity)
    masks = empty_masks(model, granularity)
    orders = {g.name: prune_order(g) for g in groups}
    done = {g.name: 0 for g in groups}
    original = {n: model.params[n].copy() for n in masks.masks}
    _, base_correct = loss_and_correct(model, x_val, y_val, batch_size, mode)
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
                restore_params(model, original)
                trial.apply(model)
                try:
                    loss, correct = loss_and_correct(model, x_val, y_val, batch_size, mode)
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
        restore_params(model, original)
    masks.pruned = dict(done)
    masks.total = {g.name: g.scores.size for g in groups}
    return masks, record


def restore_params(model: S4DModel, original: dict[str, np.ndarray]) -> None:
    """Copy the saved values ``original`` (by parameter name) back into the model's arrays."""
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


def check_tensors(model: S4DModel, tensors: Sequence[str]) -> tuple[str, ...]:
    """``tensors`` (one name or several) as a tuple, each a ``QS4D_TENSORS`` entry the model's S4D
    layers hold; a ValueError names the ones it holds otherwise."""
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
    tensors = check_tensors(model, tensors)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    x_val, y_val = check_split(model, x_val, y_val)
    mode = model.mode if mode is None else mode
    n_val = x_val.shape[0]
    params = model.params
    masks = PruneMasks(f"qs4d-{unit}")
    original = {}
    for layer in range(len(ssm_layers(model))):
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
        for layer in range(len(ssm_layers(model))):
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
        restore_params(model, original)
    return masks, {"base_accuracy": base_correct / n_val, "accuracy": final_correct / n_val,
                   "evaluations": evaluator.evaluations, "tries": tries}


