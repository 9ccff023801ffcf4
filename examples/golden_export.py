"""Golden model and RTL flow in one script: QAT model -> integer model -> vectors -> Verilog testbench.

    python examples/golden_export.py                      # train a tiny QAT model (about a minute)
    python examples/golden_export.py --checkpoint runs/qat --out runs/golden_vectors

1. Train a small recurrent QAT model on sMNIST (QS4D preset scaled down:
   256 levels everywhere, 4096 for the state, running ranges for act and
   state), or load ``--checkpoint`` (a run directory or ``S4DModel.save`` prefix).
2. Build the integer model (``qs4d_np.golden.export.from_model``) and check
   it against the QAT model and the float64 twin on ``--test`` test samples
   (prediction agreement, and the local bound of every traced tensor).
3. Export the whole-model vectors (``manifest.json`` + ``.memh``) for
   ``--samples`` test samples, as ``qs4d golden export`` does.
4. Export layer 0's SSM core on the first sample as a core vector directory
   and run the Verilog testbench (``validation/rtl``, Icarus Verilog) on it:
   the RTL must reproduce every state and output word. Without iverilog the
   step is skipped with the reason.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # validation/ is not a package of qs4d_np

from qs4d_np.data.tasks import load_task  # noqa: E402
from qs4d_np.golden import compare_dumps, write_ssm_vectors  # noqa: E402
from qs4d_np.golden.agreement import measure_agreement  # noqa: E402
from qs4d_np.golden.bundle import dataset_codes, export_bundle  # noqa: E402
from qs4d_np.golden.export import from_model  # noqa: E402
from qs4d_np.models.s4d_model import S4DModel  # noqa: E402
from qs4d_np.quant.config import QuantConfig  # noqa: E402
from qs4d_np.train.ptq import calibrate  # noqa: E402
from qs4d_np.train.trainer import TrainConfig, Trainer  # noqa: E402
from validation.sim import missing_tools, run_testbench  # noqa: E402


def train_tiny(task, out: Path, train: int, epochs: int):
    """A 1-layer, 8-channel recurrent QAT model on the first ``train`` samples."""
    quant = QuantConfig(256, state=4096, target_options={"act": {"scale_mode": "running"},
                                                         "state": {"scale_mode": "running"}})
    model = S4DModel.from_preset("qs4d", task.d_in, task.n_classes, d_model=8, d_state=8, n_layers=1,
                                 dropout=0.0, mode="recurrent", seed=0, quant=quant)
    x, _ = task.train.batch(np.arange(32))
    calibrate(model, [x], mode="recurrent")
    n_train = min(train, len(task.train))
    trainer = Trainer(model, task.train.subset(np.arange(n_train)), task.val.subset(np.arange(200)),
                      TrainConfig(epochs=epochs, batch_size=25, eval_batch_size=100, lr=0.01, seed=0),
                      out / "qat_run", progress=False)
    result = trainer.fit()
    print(f"trained on {n_train} samples, {epochs} epoch(s): val accuracy {result['best_val_acc']:.3f}")
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="QAT run directory or saved model (default: train one)")
    parser.add_argument("--out", default="runs/golden_vectors", help="output directory (runs/ is ignored by git)")
    parser.add_argument("--train", type=int, default=300, help="training samples for the tiny model")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--test", type=int, default=50, help="test samples for the agreement check")
    parser.add_argument("--samples", type=int, default=2, help="test samples in the exported vectors")
    args = parser.parse_args()
    out = Path(args.out)
    task = load_task("smnist")
    if args.checkpoint:
        path = Path(args.checkpoint)
        model = S4DModel.load(path / "best_model" if path.is_dir() else path)
    else:
        model = train_tiny(task, out, args.train, args.epochs)

    calib, _ = task.train.batch(np.arange(64))
    int_model = from_model(model, calib)
    x, labels = dataset_codes(task.test, np.arange(min(args.test, len(task.test))))
    agree = measure_agreement(int_model, x, labels, model, traced=2)
    print(f"{agree['samples']} test samples: integer accuracy {agree['integer_accuracy']:.3f}, QAT model "
          f"{agree['float_accuracy']:.3f}; predictions agree on {100 * agree['agreement_with_float']:.1f}% "
          f"(with the float64 twin: {100 * agree['agreement_with_twin']:.1f}%); local bound violations: "
          f"{agree['local_violations']}")

    manifest = export_bundle(int_model, x[:args.samples], out / "model", labels=labels[:args.samples])
    print(f"wrote {len(manifest['tensors'])} tensors to {out / 'model'} (spec version {manifest['spec_version']})")

    core = int_model.layers[0].core
    u = int_model.run(x[:1], trace=True).layers[0]["u"]
    core_dir = write_ssm_vectors(out / "core0", core, u, core.run(u))
    reason = missing_tools()
    if reason:
        print(f"RTL check skipped: {reason}")
        verdict = agree["local_violations"] == 0
    else:
        proc = run_testbench(core_dir, timeout=600)
        report = compare_dumps(core_dir, core_dir / "rtl")
        print(f"Verilog testbench (layer 0 SSM core, {u.shape[1]} steps): exit {proc.returncode}; {report.summary(3)}")
        verdict = proc.returncode == 0 and report.ok and agree["local_violations"] == 0
    (out / "summary.json").write_text(json.dumps({k: v for k, v in agree.items() if k != "local"}, indent=1))
    print("VERDICT:", "PASS" if verdict else "FAIL")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
