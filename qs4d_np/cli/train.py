"""``qs4d train``: train a float or quantization-aware S4D model (the reference's ``training.py`` flags).

Examples::

    qs4d train --dataset smnist --preset s4d-example --d_model_m 64 --epochs 5 --out runs/float
    qs4d train --dataset smnist --init-from runs/float --all_quant 16 --epochs 2 --lr 0.002 --out runs/qat4
    qs4d train --dataset cifar10 --grayscale --data-dir ~/data/cifar-10-batches-py --all_quant 64 --out runs/c6
    qs4d train ... --out runs/float --resume          # continue a killed run (same flags)
    qs4d train --dataset smnist --all_quant 64 --noise 0.02 --noise-eval --out runs/noisy  # noise-aware

The run directory's layout is documented in :mod:`qs4d_np.cli.common`.
Values of the ``--*_quant`` flags are numbers of quantization states, as in
the reference (``--all_quant 16`` is 4 bits).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qs4d_np.cli.common import (ARCH_FLAGS, CommandError, add_data_flags, add_model_flags, add_quant_flags,
                                build_model, check_model_fits, check_out_dir, check_training_memory, command,
                                data_settings, load_data, load_model, model_path, model_shape, non_negative_float,
                                non_negative_int, positive_float, positive_int, quant_config)
from qs4d_np.hardware.noise import PROTOCOLS, TARGETS, noise_sites
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.train.checkpoint import CheckpointError, checkpoint_exists, load_checkpoint_meta
from qs4d_np.train.config import TrainConfig
from qs4d_np.train.trainer import Trainer


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a float or QAT model",
                                   description=__doc__.split("\n\n")[0])
    add_data_flags(parser, default_dataset="smnist")
    add_model_flags(parser)
    add_quant_flags(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=100)
    group.add_argument("--batch_size", type=positive_int, default=64)
    group.add_argument("--eval_batch_size", type=positive_int, default=None,
                       help="validation/test batch (default: --batch_size)")
    group.add_argument("--lr", type=positive_float, default=0.01)
    group.add_argument("--weight_decay", type=non_negative_float, default=0.05)
    group.add_argument("--warmup", type=non_negative_int, default=0, metavar="EPOCHS", help="linear warmup epochs")
    group.add_argument("--clip", type=positive_float, default=None, metavar="NORM",
                       help="clip the global gradient norm")
    group.add_argument("--seed", type=non_negative_int, default=0, help="model init, shuffling, dropout, noise")
    group.add_argument("--noise", type=non_negative_float, default=0.0, metavar="SIGMA",
                       help="noise-aware training: fresh Gaussian noise on the values every training forward "
                            "computes with, after the quantizers (qs4d_np.hardware.noise.transient_noise)")
    group.add_argument("--noise-protocol", default="qs4d", choices=PROTOCOLS,
                       help="std SIGMA x (max - min) per real part (qs4d, the reference) or SIGMA x max|w|")
    group.add_argument("--noise-targets", nargs="+", default=["A"], choices=TARGETS, metavar="TARGET",
                       help=f"values the noise reaches, of {', '.join(TARGETS)} (default: A)")
    group.add_argument("--noise-eval", action="store_true",
                       help="keep the noise on in validation and test (the reference's noise-aware training)")
    group.add_argument("--init-from", default=None, metavar="CKPT",
                       help="start from these weights (float or QAT run / model); with --*_quant flags: "
                            "QAT fine-tuning")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    group.add_argument("--out", required=True, metavar="DIR", help="run directory")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _initial_model(args: argparse.Namespace, task, quant) -> S4DModel:
    batch = max(args.batch_size, args.eval_batch_size or 0)
    if args.init_from is None:
        check_training_memory(model_shape(args), task, batch)
        return build_model(args, task, quant)
    source = load_model(args.init_from)
    check_training_memory({k: source.config[k] for k in ("d_model", "d_state", "n_layers")}, task, batch)
    check_model_fits(source, task, f"--init-from {args.init_from}")
    given = {key: getattr(args, flag) for flag, key in ARCH_FLAGS.items() if getattr(args, flag) is not None}
    clash = {k: (v, source.config[k]) for k, v in given.items() if source.config.get(k) != v}
    if clash:
        raise CommandError(f"--init-from {args.init_from} is a model with other settings "
                           f"({', '.join(f'{k}={c} there, {v} asked' for k, (v, c) in clash.items())}): "
                           "drop the architecture flags or start from a matching checkpoint")
    source.mode = args.mode
    source.config["mode"] = args.mode
    if quant is None and args.abar is None:
        return source  # float fine-tuning (or a QAT model trained on at its own widths)
    from qs4d_np.train.ptq import with_quant
    return with_quant(source, quant if quant is not None else source.quant, abar=args.abar)


def resume_hint(args: argparse.Namespace) -> str:
    """Where an interrupted ``qs4d train`` continues (the epoch its last checkpoint holds)."""
    out = Path(args.out)
    try:
        epoch = load_checkpoint_meta(out, "last")["epoch"]
    except (OSError, ValueError, KeyError, TypeError, CheckpointError):
        return f"no epoch was checkpointed in {out}; rerun the same command to start over"
    return f"{out}/last.json holds epoch {epoch}; rerun the same command with --resume to continue from there"


@command("train", interrupted=resume_hint)
def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.resume and not checkpoint_exists(out, "last"):
        raise CommandError(f"cannot --resume: {out} holds no checkpoint last.json")
    check_out_dir(out)  # before any work: not a file, writable
    if not args.resume and checkpoint_exists(out, "last"):
        raise CommandError(f"{out} already holds a run (last.json): pass --resume to continue it or choose "
                           "another --out (nothing was overwritten)")
    if args.init_from is not None:
        model_path(args.init_from)  # fail before loading data
    settings = data_settings(args)
    task = load_data(settings)
    quant = quant_config(args)
    model = _initial_model(args, task, quant)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                         eval_batch_size=args.eval_batch_size or args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, warmup_epochs=args.warmup, clip_norm=args.clip,
                         seed=args.seed, noise=args.noise, noise_protocol=args.noise_protocol,
                         noise_targets=tuple(args.noise_targets), noise_eval=args.noise_eval)
    if args.noise > 0:
        noise_sites(model, config.noise_targets)  # a target the model lacks fails now, not in the first step
    info = {"data": settings, "task": task.info(),
            "init_from": None if args.init_from is None else str(model_path(args.init_from))}
    trainer = Trainer(model, task.train, task.val, config, out, test_data=task.test, run_info=info,
                      progress=not args.quiet)
    results = trainer.fit(resume=args.resume)
    print(json.dumps(results, sort_keys=True))
    return 0
