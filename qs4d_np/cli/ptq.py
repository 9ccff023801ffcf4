"""``qs4d ptq``: post-training quantization sweep of a float model (the QS4D PTQ protocol).

Example::

    qs4d ptq --checkpoint runs/float --bits 2 3 4 6 8 --targets all A C state --out runs/float/ptq

For every target and width b the float weights are quantized with n = 2**b
states, one scale per tensor or per channel (``--granularity``), static
activation and state ranges calibrated on ``--calib-batches`` training batches, and
the model is evaluated on the test set. Writes ``DIR/ptq.csv`` (one row per
(target, bits): target, bits, levels, grid, granularity, accuracy) and ``DIR/ptq.json``
(the rows under ``"ptq"`` plus ``float_accuracy``, the checkpoint and the
task), which ``qs4d plot`` reads.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
from typing import Any

from qs4d_np.cli.common import (add_data_flags, add_grid_flags, check_model_fits, check_out_dir, command,
                                data_settings, load_data, load_model, positive_int, run_info)
from qs4d_np.data.loader import BatchIterator
from qs4d_np.ssm.s4d import MODES
from qs4d_np.data.sequence import SequenceDataset
from qs4d_np.io import atomic_write_json, atomic_write_text
from qs4d_np.train.evaluate import evaluate_model

PTQ_TARGETS = ("all", "A", "B", "C", "D", "dt", "linear", "act", "state", "coder")
CSV_COLUMNS = ("target", "bits", "levels", "grid", "granularity", "accuracy")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ptq", help="post-training quantization sweep (CSV + JSON)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="float run directory or saved model")
    parser.add_argument("--bits", type=positive_int, nargs="+", default=[2, 3, 4, 5, 6, 8, 10, 12, 16])
    parser.add_argument("--targets", choices=PTQ_TARGETS, nargs="+", default=["all"])
    add_grid_flags(parser)
    parser.add_argument("--calib-batches", type=positive_int, default=4, metavar="N",
                        help="training batches that calibrate the static ranges")
    parser.add_argument("--mode", choices=MODES, default="conv")
    parser.add_argument("--batch_size", type=positive_int, default=64)
    add_data_flags(parser, train=False)
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.set_defaults(func=run)


def calibration_batches(dataset: SequenceDataset, batch_size: int, n_batches: int) -> list:
    """The first ``n_batches`` input batches x (batch, length, d_in) of ``dataset``, in order."""
    return [x for x, _ in itertools.islice(BatchIterator(dataset, batch_size).epoch(), n_batches)]


def sweep(model: Any, task: Any, targets: list[str], bits: list[int], *, grid: str = "narrow",
          granularity: str = "tensor", mode: str = "conv", batch_size: int = 64,
          calib_batches: int = 4) -> dict[str, Any]:
    """Float accuracy and the PTQ rows of ``model`` on ``task.test`` (what ``ptq.json`` holds)."""
    from qs4d_np.train.ptq import ptq_sweep

    def accuracy(candidate: Any) -> float:
        return evaluate_model(candidate, BatchIterator(task.test, batch_size), mode=mode)["acc"]

    rows = ptq_sweep(model, list(targets), list(bits), calibration_batches(task.train, batch_size, calib_batches),
                     accuracy, grid=grid, mode=mode, per_channel=granularity == "channel")
    for row in rows:
        row["granularity"] = granularity
    return {"float_accuracy": accuracy(model), "mode": mode, "grid": grid, "granularity": granularity,
            "task": task.name, "test_samples": len(task.test), "ptq": rows}


def csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


@command("ptq")
def run(args: argparse.Namespace) -> int:
    out = check_out_dir(args.out)
    model = load_model(args.checkpoint)
    settings = data_settings(args, run_info(args.checkpoint).get("data"))
    task = load_data(settings)
    check_model_fits(model, task, f"--checkpoint {args.checkpoint}")
    result = sweep(model, task, args.targets, args.bits, grid=args.grid, granularity=args.granularity,
                   mode=args.mode, batch_size=args.batch_size, calib_batches=args.calib_batches)
    result["checkpoint"] = str(args.checkpoint)
    atomic_write_text(out / "ptq.csv", csv_text(result["ptq"]))
    atomic_write_json(out / "ptq.json", result)
    print(f"float accuracy {result['float_accuracy']:.4f}")
    print(csv_text(result["ptq"]), end="")
    print(json.dumps({"wrote": [str(out / "ptq.csv"), str(out / "ptq.json")]}))
    return 0
