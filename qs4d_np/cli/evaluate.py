"""``qs4d eval``: test accuracy of a trained model, digitally or on simulated crossbars.

Examples::

    qs4d eval --checkpoint runs/float                       # test set of the run's dataset
    qs4d eval --checkpoint runs/qat4 --mode recurrent
    qs4d eval --checkpoint runs/qat4 --analog crossbar.json --out analog.json

Prints one JSON object: ``accuracy``, ``loss``, ``samples`` (digital), or the
dict of ``qs4d_np.hardware.imssa.evaluate_analog`` (``--analog``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from qs4d_np.cli.common import (add_data_flags, check_model_fits, check_out_file, command, data_settings,
                                load_data, load_model, non_negative_int, positive_int, run_info)
from qs4d_np.data.loader import BatchIterator
from qs4d_np.ssm.s4d import MODES
from qs4d_np.io import atomic_write_json
from qs4d_np.train.checkpoint import to_jsonable
from qs4d_np.train.trainer import evaluate_model


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
    parser.add_argument("--analog", default=None, metavar="CONFIG.json",
                        help="simulate the model on crossbars described by this CrossbarConfig file")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the analog simulation's noise")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="also write the result here")
    parser.set_defaults(func=run)


@command("eval")
def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_out_file(args.out)
    model = load_model(args.checkpoint)
    settings = data_settings(args, run_info(args.checkpoint).get("data"))
    if args.analog is not None and not Path(args.analog).is_file():
        raise FileNotFoundError(f"--analog {args.analog}: no such file")
    task = load_data(settings)
    check_model_fits(model, task, f"--checkpoint {args.checkpoint}")
    dataset = task.test if args.split == "test" else task.val
    if args.analog is None:
        scores = evaluate_model(model, BatchIterator(dataset, args.batch_size), mode=args.mode)
        result = {"accuracy": scores["acc"], "loss": scores["loss"], "samples": scores["count"],
                  "nonfinite_logits": scores["nonfinite"]}
    else:
        from qs4d_np.hardware.config import CrossbarConfig
        from qs4d_np.hardware.imssa import evaluate_analog
        x, y = dataset.batch(np.arange(len(dataset)))
        result = to_jsonable(evaluate_analog(model, x, y, CrossbarConfig.load(args.analog), batch_size=args.batch_size,
                                      seed=args.seed))
    result.update(checkpoint=str(args.checkpoint), task=settings["task"], split=args.split,
                  mode=args.mode or model.mode)
    print(json.dumps(result, sort_keys=True))
    if args.out is not None:
        atomic_write_json(args.out, result)
    return 0
