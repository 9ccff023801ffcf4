"""``qs4d noise``: test accuracy of trained models under noise, swept over noise levels and seeds.

Examples::

    qs4d noise --checkpoint runs/float runs/qat4 --sigma 0 0.005 0.01 0.02 0.03 0.05 --seeds 5 --out runs/noiseA
    qs4d noise --checkpoint runs/qat4 --protocol absmax --targets A C linear --sigma 0 0.02 --out runs/noiseW
    qs4d noise --checkpoint runs/qat4 --protocol crossbar --sigma 0 0.01 0.02 --limit-test 200 --out runs/read
    qs4d noise --checkpoint runs/qat8r --protocol crossbar --analog increment.json --calib-batches 4 \
        --read-noise output --sigma 0 0.01 0.03 0.06 --out runs/read_out

Protocols (``qs4d_np.hardware.robustness``): ``qs4d`` (the reference's: Gaussian noise of std
sigma x (max - min) of each real part of the ``--targets`` values, after their quantizers,
redrawn at every forward), ``absmax`` (std sigma x max|w|), ``crossbar`` (the model on crossbars
with read noise sigma at every MVM, on every array, no ``--targets``: ``--read-noise weight``
sets w_noise = sigma, ``output`` out_noise = sigma; the arrays are ``--analog`` (a preset or a
CrossbarConfig JSON file; default ideal) with converter ranges calibrated on ``--calib-batches``
training batches, 0 by default: the config's common ranges). Run s of every model and sigma
uses the generator ``default_rng([--seed, s])``.

Prints the mean and std of the accuracy over the seeds per (checkpoint, sigma) and writes, each
atomically, ``DIR/noise.json`` (``records``: one {checkpoint, sigma, seed, stream, accuracy,
nonfinite} per run, ``summary``: the curves, and the settings), ``DIR/noise.csv`` (the records)
and ``DIR/noise.png`` (accuracy vs sigma, one curve per checkpoint, error bars = std over seeds).
``nonfinite`` counts the samples of batches whose noisy forward overflowed (counted as wrong).
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from qs4d_np.cli.common import (CommandError, add_data_flags, check_model_fits, check_out_dir, command,
                                data_settings, load_data, load_model, non_negative_float, non_negative_int,
                                positive_int, run_info)
from qs4d_np.hardware.noise import TARGETS
from qs4d_np.cli.evaluate import analog_config, calib_sequences
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.robustness import PROTOCOLS, READ_NOISES, noise_sweep, sweep_records
from qs4d_np.cli.plot import save_png
from qs4d_np.io import atomic_write_json, atomic_write_text
from qs4d_np.ssm.s4d import MODES

RECORD_FIELDS = ("checkpoint", "sigma", "seed", "accuracy", "nonfinite")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("noise", help="accuracy under noise, swept over sigma and seeds",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, nargs="+", metavar="RUN",
                        help="run directories or saved models (the data comes from the first run's record)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="qs4d")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=None, metavar="TARGET",
                        help=f"values the noise reaches (qs4d / absmax), of {', '.join(TARGETS)}; default A")
    parser.add_argument("--sigma", required=True, nargs="+", type=non_negative_float, metavar="S",
                        help="noise levels (fractions: 0.01 = 1%% of the range / max|w| / g_max)")
    parser.add_argument("--seeds", type=positive_int, default=5, metavar="K", help="noise draws per level")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="first word of every run's seed")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="S4D forward for qs4d / absmax (default: each model's own); crossbar is recurrent")
    parser.add_argument("--batch-size", type=positive_int, default=256,
                        help="evaluation batch; the noise is redrawn per batch (quantized activations are "
                             "scaled per batch)")
    parser.add_argument("--analog", default=None, metavar="CONFIG",
                        help="crossbar: the arrays, a preset or a CrossbarConfig JSON file (default ideal)")
    parser.add_argument("--calib-batches", type=non_negative_int, default=0, metavar="N",
                        help="crossbar: calibrate the converter ranges on N training batches (default 0: none)")
    parser.add_argument("--read-noise", choices=READ_NOISES, default="weight",
                        help="crossbar: sigma is w_noise (weight, default) or out_noise (output)")
    add_data_flags(parser, train=False)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for noise.json, noise.csv, noise.png")
    parser.set_defaults(func=run)


def _csv(records: list[dict[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(RECORD_FIELDS)
    writer.writerows([r[k] for k in RECORD_FIELDS] for r in records)
    return text.getvalue()


def plot_noise_sweep(sweep: Mapping[str, Mapping[str, list]], out: str | Path, xlabel: str,
                     title: str | None = None) -> Path:
    """Accuracy (%) vs sigma (%) of a ``noise_sweep`` result, one curve per model, error bars = std; PNG
    written atomically to ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, curve in sweep.items():
        ax.errorbar(100 * np.asarray(curve["sigma"]), 100 * np.asarray(curve["mean"]),
                    yerr=100 * np.asarray(curve["std"]), marker="o", capsize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return save_png(fig, out)


XLABELS = {"qs4d": "noise std / value range (%)", "absmax": "noise std / max|w| (%)",
           "crossbar": "read noise w_noise / g_max (%)", "crossbar-output": "read noise out_noise / full scale (%)"}


@command("noise")
def run(args: argparse.Namespace) -> int:
    out = check_out_dir(args.out)
    if len(set(args.checkpoint)) != len(args.checkpoint):
        raise CommandError(f"--checkpoint names a run twice: {args.checkpoint}")
    if args.protocol == "crossbar" and args.targets is not None:
        raise CommandError("--targets applies to the qs4d and absmax protocols; crossbar read noise reaches "
                           "every array")
    if args.protocol == "crossbar" and args.mode == "conv":
        raise CommandError("--mode conv: the crossbar protocol runs the model recurrently")
    crossbar_flags = [f for f, given in (("--analog", args.analog is not None), ("--calib-batches", args.calib_batches),
                                         ("--read-noise", args.read_noise != "weight")) if given]
    if args.protocol != "crossbar" and crossbar_flags:
        raise CommandError(f"{', '.join(crossbar_flags)} apply to --protocol crossbar, not {args.protocol}")
    base_config = None if args.analog is None else analog_config(args.analog)  # fails before the data loads
    models = {str(c): load_model(c) for c in args.checkpoint}  # a missing run fails before the data loads
    settings = data_settings(args, run_info(args.checkpoint[0]).get("data"))
    task = load_data(settings)
    for name, model in models.items():
        check_model_fits(model, task, f"--checkpoint {name}")
    x, y = task.test.batch(np.arange(len(task.test)))
    targets = None if args.protocol == "crossbar" else tuple(args.targets or ("A",))
    calib = calib_sequences(task, args.calib_batches, args.batch_size)
    sweep = noise_sweep(models, x, y, args.protocol, args.sigma, targets=targets, seeds=args.seeds,
                        seed=args.seed, batch_size=args.batch_size, mode=args.mode, base_config=base_config,
                        calib=calib, read_noise=args.read_noise)
    records = sweep_records(sweep, args.seed)
    for name, curve in sweep.items():
        for s, mean, std, lost in zip(curve["sigma"], curve["mean"], curve["std"], curve["nonfinite"]):
            extra = f", {sum(lost)} samples lost to overflow" if sum(lost) else ""
            print(f"{name}  sigma {s:g}: accuracy {100 * mean:.2f} +- {100 * std:.2f} % "
                  f"({args.seeds} seeds{extra})")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "noise.json", {
        "protocol": args.protocol, "targets": None if targets is None else list(targets),
        "mode": args.mode, "sigmas": list(args.sigma),
        "crossbar": None if args.protocol != "crossbar" else {
            "config": (base_config or CrossbarConfig.ideal()).to_dict(), "read_noise": args.read_noise,
            "calib_samples": 0 if calib is None else int(calib.shape[0])}, "seeds": args.seeds, "seed": args.seed,
        "batch_size": args.batch_size, "task": settings["task"], "samples": int(len(y)),
        "checkpoints": list(models), "records": records, "summary": sweep})
    atomic_write_text(out / "noise.csv", _csv(records))
    xlabel = XLABELS["crossbar-output" if args.protocol == "crossbar" and args.read_noise == "output" else args.protocol]
    plot_noise_sweep(sweep, out / "noise.png", xlabel,
                     f"{args.protocol} noise on {', '.join(targets) if targets else 'every array'}")
    print(f"wrote {out / 'noise.json'}, {out / 'noise.csv'}, {out / 'noise.png'}")
    return 0
