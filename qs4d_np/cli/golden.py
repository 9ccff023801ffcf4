"""``qs4d golden``: export integer test vectors of a trained QAT model, and compare an RTL dump.

Examples::

    qs4d golden export --checkpoint runs/qat --out vectors --samples 4
    qs4d golden compare vectors --rtl rtl_dump

``export`` builds the integer model (docs/integer_spec.md) from the checkpoint
(its own quantization config, or the ``--*_quant`` flags for a float model),
calibrated on ``--calib`` training samples, runs it on the first
``--samples`` test samples and writes ``DIR/manifest.json`` and the ``.memh``
files (weights, inputs, every expected per-step tensor). ``compare`` checks
every expected word against the same file under ``--rtl`` and exits 1 on any
mismatch, 0 when all agree.
"""
from __future__ import annotations

import argparse

import numpy as np

from qs4d_np.cli.common import (add_data_flags, add_quant_flags, check_model_fits, check_out_dir, command,
                                data_settings, load_data, load_model, positive_int, quant_config, run_info)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("golden", help="integer golden model: export test vectors, compare RTL dumps",
                                   description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="golden_command", required=True, metavar="ACTION")
    exp = sub.add_parser("export", help="write manifest.json and .memh vectors of a trained model")
    exp.add_argument("--checkpoint", required=True, metavar="CKPT", help="run directory or saved model")
    exp.add_argument("--out", required=True, metavar="DIR")
    exp.add_argument("--samples", type=positive_int, default=4, metavar="K", help="test samples to export")
    exp.add_argument("--calib", type=positive_int, default=32, metavar="N",
                     help="training samples that calibrate the fixed steps")
    add_data_flags(exp, train=False)
    add_quant_flags(exp)
    exp.set_defaults(func=run_export)
    cmp = sub.add_parser("compare", help="compare an RTL dump against exported vectors (exit 1 on mismatch)")
    cmp.add_argument("vectors", metavar="DIR", help="directory written by 'qs4d golden export'")
    cmp.add_argument("--rtl", required=True, metavar="DUMPDIR", help="RTL dump with the same file names")
    cmp.add_argument("--show", type=positive_int, default=10, metavar="N", help="mismatches to list")
    cmp.set_defaults(func=run_compare)


@command("golden export")
def run_export(args: argparse.Namespace) -> int:
    from qs4d_np.golden.bundle import dataset_codes, export_bundle
    from qs4d_np.golden.export import from_model

    check_out_dir(args.out)
    model = load_model(args.checkpoint)
    task = load_data(data_settings(args, run_info(args.checkpoint).get("data")))
    check_model_fits(model, task, f"checkpoint {args.checkpoint}")
    calib_x, _ = task.train.batch(np.arange(min(args.calib, len(task.train))))
    int_model = from_model(model, calib_x, quant=quant_config(args))
    x, labels = dataset_codes(task.test, np.arange(min(args.samples, len(task.test))))
    manifest = export_bundle(int_model, x, args.out, labels=labels)
    sat = sum(sum(d.values()) for d in manifest["saturation"])
    print(f"wrote {len(manifest['tensors'])} tensors of {x.shape[0]} sample(s) x {x.shape[1]} steps to "
          f"{args.out} (spec version {manifest['spec_version']}; {sat} saturation event(s))")
    return 0


@command("golden compare")
def run_compare(args: argparse.Namespace) -> int:
    from qs4d_np.golden.compare import compare_dumps

    report = compare_dumps(args.vectors, args.rtl)
    print(report.summary(args.show))
    return 0 if report.ok else 1
