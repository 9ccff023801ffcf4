"""Provenance of the pinned compatibility data in this folder (``tests/test_compat.py``).

Run once by main at commit 7b47e21, before the S4D layer was restructured (issue 11), with

    PYTHONPATH=. python tests/data/compat/make.py

It saves three small models with ``S4DModel.save`` (one float, two QAT: running ranges
with BatchNorm, learned LSQ steps with a discrete Abar), their evaluation logits in both
modes and their parameter gradients on a fixed input (``expected.npz``), and the SHA-256 of
every file of the golden export of the running-range model (``golden_sha256.json``).
``run_qat16/`` is a training run directory of the same commit, from

    qs4d train --limit-train 60 --limit-test 20 --epochs 1 --d_model_m 4 --d_state 4 \
        --n_layers_m 1 --all_quant 16 --mode recurrent --seed 0 --out run_qat16 --quiet

(its ``metrics.jsonl`` left out); its best model's logits are pinned too.
The files pin what those versions computed: do not regenerate them to make a test pass.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from qs4d_np.core.loss import SoftmaxCrossEntropy
from qs4d_np.golden.bundle import export_bundle
from qs4d_np.golden.export import from_model
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant import QuantConfig
from qs4d_np.train.ptq import calibrate  # qs4d_np.quant.ptq at 7b47e21

HERE = Path(__file__).resolve().parent
RUNNING = {"act": {"scale_mode": "running"}, "state": {"scale_mode": "running"}}


def models() -> dict[str, S4DModel]:
    """The pinned models, built and brought to a trained-looking state deterministically."""
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (4, 12, 1)) / 255.0
    out = {
        "float_example": S4DModel.from_preset("s4d-example", 1, 3, d_model=6, d_state=8, n_layers=2,
                                              dropout=0.0, seed=1, learn_B=True),
        "qat_running": S4DModel.from_preset("qs4d", 1, 3, d_model=4, d_state=4, n_layers=2, dropout=0.0,
                                            seed=3, mode="recurrent",
                                            quant=QuantConfig(256, state=4096, target_options=RUNNING)),
        "qat_learned_discrete": S4DModel.from_preset(
            "s4d-example", 1, 3, d_model=4, d_state=6, n_layers=2, dropout=0.0, seed=5, abar="discrete",
            mode="recurrent", quant=QuantConfig(16, per_channel=True, scale_mode="learned", act=256,
                                                state=256)),
    }
    for model in out.values():  # BatchNorm statistics, learned steps of both modes' quantizers
        for mode in ("conv", "recurrent"):
            model.forward(x.astype(model.dtype), training=True, mode=mode)
    for mode in ("conv", "recurrent"):  # the state target's range quantizes K, u in conv mode
        calibrate(out["qat_running"], [x], mode=mode)
    return out


def inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (3, 10, 1) float, labels (3,), pixels (3, 10, 1) int) of the pinned evaluations."""
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, (3, 10, 1))
    return pixels / 255.0, rng.integers(0, 3, 3), pixels


def evaluate(model: S4DModel, x: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Logits of both modes in evaluation, and the gradients of a training step in the model's mode."""
    got = {mode: model.forward(x.astype(model.dtype), mode=mode) for mode in ("conv", "recurrent")}
    loss = SoftmaxCrossEntropy()
    logits = model.forward(x.astype(model.dtype), training=True)
    loss.forward(logits, labels)
    model.backward(loss.backward())
    got.update({f"grad/{k}": np.array(v) for k, v in model.grads.items()})
    return got


def golden_files(model: S4DModel, out_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of the golden export of ``model`` on the pinned pixels."""
    x, _, pixels = inputs()
    export_bundle(from_model(model, x), pixels, out_dir)
    return {str(p.relative_to(out_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out_dir.rglob("*")) if p.is_file()}


def main() -> None:
    x, labels, _ = inputs()
    expected = {}
    for name, model in models().items():
        model.save(HERE / name)
        loaded = S4DModel.load(HERE / name)  # evaluate what the files hold
        expected.update({f"{name}/{k}": v for k, v in evaluate(loaded, x, labels).items()})
    run_model = S4DModel.load(HERE / "run_qat16" / "best_model")
    expected.update({f"run_qat16/{k}": v for k, v in evaluate(run_model, x, labels).items()})
    np.savez(HERE / "expected.npz", **expected)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        hashes = golden_files(S4DModel.load(HERE / "qat_running"), Path(tmp) / "vec")
    (HERE / "golden_sha256.json").write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(expected)} arrays and {len(hashes)} golden file hashes", file=sys.stderr)


if __name__ == "__main__":
    main()
