"""``qs4d eval``: test accuracy of a trained model, digitally or on simulated crossbars.

Examples::

    qs4d eval --checkpoint runs/float                       # test set of the run's dataset
    qs4d eval --checkpoint runs/qat4 --mode recurrent
    qs4d eval --checkpoint runs/qat4 --analog realistic --calib-batches 4 --out analog.json
    qs4d eval --checkpoint runs/qat4 --analog crossbar.json --analog-seeds 5

Prints one JSON object: ``accuracy``, ``loss``, ``samples`` (digital), or with ``--analog``
(a ``CrossbarConfig`` JSON file or a preset: ``ideal``, ``converters`` (the default
converters, no noise) or ``realistic``) the dict of ``qs4d_np.hardware.evaluate_analog``:
``accuracy``, ``digital_accuracy``, ``agreement`` (analog and digital recurrent predictions
equal), ``overflowed``, ``arrays``, ``adc_conversions``, ``adc_clipped``, ... The converter
ranges are calibrated on the first ``--calib-batches`` training batches (0: the config's
common ranges). With ``--analog-seeds K`` > 1, seeds seed .. seed+K-1 each program and read
the arrays anew; the object then holds their mean and std and the per-seed results.
``--static-ranges`` first rebuilds a QAT model with running state and act ranges calibrated
on those batches (``train.ptq.static_ranges``), which ``state_grid: "model"`` configs need
when the model was trained with absmax ranges; analog and digital then run that model.

    qs4d eval --checkpoint runs/qat8r3 --analog matched.json --calib-batches 6 --static-ranges
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from qs4d_np.cli.common import (CommandError, add_data_flags, check_model_fits, check_out_file, command,
                                data_settings, load_data, load_model, non_negative_int, positive_float, positive_int,
                                run_info)
from qs4d_np.data.loader import BatchIterator
from qs4d_np.data.tasks import Task
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.convert import evaluate_analog
from qs4d_np.io import atomic_write_json
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.ssm.s4d import MODES
from qs4d_np.train.checkpoint import to_jsonable
from qs4d_np.train.ptq import static_ranges
from qs4d_np.train.evaluate import evaluate_model

# --analog presets
ANALOG_PRESETS = {"ideal": CrossbarConfig.ideal, "converters": CrossbarConfig, "realistic": CrossbarConfig.realistic}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model on the test set",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="run directory or saved model")
    add_data_flags(parser, train=False)
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="S4D evaluation path (default: the model's)")
    parser.add_argument("--batch_size", type=positive_int, default=64,
                        help="evaluation batch (quantized activations are scaled per batch)")
    parser.add_argument("--analog", default=None, metavar="CONFIG",
                        help="simulate the model on crossbars: a CrossbarConfig JSON file or a preset "
                             f"({', '.join(ANALOG_PRESETS)})")
    parser.add_argument("--calib-batches", type=non_negative_int, default=4, metavar="N",
                        help="with --analog: calibrate the converter ranges on N training batches (0: none)")
    parser.add_argument("--state-bound", type=positive_float, default=None, metavar="B",
                        help="with --analog: the state registers' bound (default: 16x the calibrated range)")
    parser.add_argument("--static-ranges", action="store_true",
                        help="with --analog: first give the model's state and act quantizers running ranges "
                             "calibrated on the --calib-batches batches (train.ptq.static_ranges), e.g. for a "
                             "config with state_grid 'model' on a model trained with absmax ranges")
    parser.add_argument("--analog-seeds", type=positive_int, default=1, metavar="K",
                        help="with --analog: K programmings (seeds seed .. seed+K-1), mean and std")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the analog simulation's noise")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="also write the result here")
    parser.set_defaults(func=run)


def analog_config(name: str) -> CrossbarConfig:
    """``--analog``: a preset name or a CrossbarConfig JSON file (errors name the file and the key)."""
    if name in ANALOG_PRESETS:
        return ANALOG_PRESETS[name]()
    if not Path(name).is_file():
        raise CommandError(f"--analog {name}: no such file, and not a preset ({', '.join(ANALOG_PRESETS)})")
    try:
        return CrossbarConfig.load(name)
    except (TypeError, ValueError) as exc:
        raise CommandError(f"--analog {name}: {exc}") from None


def calib_sequences(task: Task, batches: int, batch_size: int) -> np.ndarray | None:
    """``--calib-batches``: the first ``batches`` training batches (None for 0)."""
    if not batches:
        return None
    calib, _ = task.train.batch(np.arange(min(len(task.train), batches * batch_size)))
    return calib


def _analog(args: argparse.Namespace, model: S4DModel, task: Task, dataset: Any) -> dict[str, Any]:
    config = analog_config(args.analog)
    calib = calib_sequences(task, args.calib_batches, args.batch_size)
    if args.static_ranges:
        model = static_ranges(model, (calib[i:i + args.batch_size] for i in range(0, len(calib), args.batch_size)))
    x, y = dataset.batch(np.arange(len(dataset)))
    runs = [to_jsonable(evaluate_analog(model, x, y, config, batch_size=args.batch_size, seed=args.seed + k,
                                        state_bound=args.state_bound, calib=calib))
            for k in range(args.analog_seeds)]
    result = dict(runs[0])
    if len(runs) > 1:
        for key in ("accuracy", "agreement", "overflowed"):
            values = np.array([r[key] for r in runs], dtype=np.float64)
            result[key] = float(values.mean())
            result[f"{key}_std"] = float(values.std())
        result["seeds"] = [args.seed + k for k in range(len(runs))]
        result["runs"] = runs
    result.update(crossbar=config.to_dict(), calib_samples=0 if calib is None else int(calib.shape[0]),
                  static_ranges=bool(args.static_ranges))
    return result


@command("eval")
def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_out_file(args.out)
    model = load_model(args.checkpoint)
    settings = data_settings(args, run_info(args.checkpoint).get("data"))
    if args.analog is not None:
        analog_config(args.analog)  # a bad config fails before the data loads
    if args.static_ranges and (args.analog is None or not args.calib_batches):
        raise CommandError("--static-ranges calibrates on the --calib-batches batches of an --analog evaluation: "
                           "give --analog and --calib-batches >= 1")
    task = load_data(settings)
    check_model_fits(model, task, f"--checkpoint {args.checkpoint}")
    dataset = task.test if args.split == "test" else task.val
    if args.analog is None:
        scores = evaluate_model(model, BatchIterator(dataset, args.batch_size), mode=args.mode)
        result = {"accuracy": scores["acc"], "loss": scores["loss"], "samples": scores["count"],
                  "nonfinite_logits": scores["nonfinite"]}
    else:
        result = _analog(args, model, task, dataset)
    result.update(checkpoint=str(args.checkpoint), task=settings["task"], split=args.split,
                  mode=("analog recurrent" if args.analog is not None else args.mode or model.mode))
    print(json.dumps(result, sort_keys=True))
    if args.out is not None:
        atomic_write_json(args.out, result)
    return 0
