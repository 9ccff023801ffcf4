"""Agreement of the integer model with the fake-quant model it came from (docs/integer_spec.md, section 6).

``measure_agreement`` runs the integer model, the float64 twin and (given)
the QAT model's own recurrent evaluation forward on the same samples and
reports prediction agreement, accuracies and logit differences; on the first
``traced`` samples it also runs the teacher-forced local check of every traced
tensor (``twin.local_agreement``).
"""
from __future__ import annotations

import numpy as np

from qs4d_np.core.checks import check_array, check_int
from qs4d_np.golden.fast import run_fast
from qs4d_np.golden.model import IntegerModel
from qs4d_np.golden.twin import local_agreement, run_free


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def measure_agreement(model: IntegerModel, x: np.ndarray, labels: np.ndarray, float_model=None, *,
                      batch: int = 100, traced: int = 8) -> dict:
    """x: int input codes (n, L, d_in); labels (n,); float_model: an S4DModel taking x * steps['in'].

    Returns a JSON-able dict: samples; integer / twin / float accuracies;
    prediction agreement of the integer model with the twin and with the float
    model; the largest logit difference to the twin in logit LSBs; the total
    saturation events; and ``local`` (per traced tensor: words, differing words,
    largest difference, violations of the bound) over the first ``traced`` samples.
    """
    x = check_array("x", x, ndim=3, min_size=1)
    labels = check_array("labels", labels, shape=(x.shape[0],))
    batch = check_int("batch", batch, min_value=1)
    traced = check_int("traced", traced, min_value=0)
    n = x.shape[0]
    pred_int, pred_twin, pred_float = [], [], []
    max_logit_diff, saturation = 0, {}
    for sl in _chunks(n, batch):
        run = run_fast(model, x[sl])  # bit-identical to model.run (tested), faster
        twin = run_free(model, x[sl])
        pred_int.append(run.predictions)
        pred_twin.append(twin["predictions"])
        max_logit_diff = max(max_logit_diff, int(np.abs(run.logits - twin["logits"]).max()))
        for i, counts in enumerate(run.saturation):
            for k, v in counts.items():
                saturation[f"layers.{i}.{k}"] = saturation.get(f"layers.{i}.{k}", 0) + v
        if float_model is not None:
            logits = float_model.forward((x[sl] * model.steps["in"]).astype(float_model.dtype), training=False,
                                         mode="recurrent")
            pred_float.append(np.argmax(logits, axis=1))
    pred_int, pred_twin = np.concatenate(pred_int), np.concatenate(pred_twin)
    out = {"samples": n, "integer_accuracy": float(np.mean(pred_int == labels)),
           "twin_accuracy": float(np.mean(pred_twin == labels)),
           "agreement_with_twin": float(np.mean(pred_int == pred_twin)),
           "max_logit_diff_lsb_vs_twin": max_logit_diff, "saturation": saturation}
    if float_model is not None:
        pred_float = np.concatenate(pred_float)
        out.update({"float_accuracy": float(np.mean(pred_float == labels)),
                    "agreement_with_float": float(np.mean(pred_int == pred_float))})
    if traced:
        xs = x[:traced]
        out["local"] = local_agreement(model, xs, model.run(xs, trace=True))
        out["local_violations"] = sum(r["violations"] for r in out["local"].values())
    return out
