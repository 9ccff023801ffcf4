"""``qs4d golden``: export integer test vectors of a trained QAT model, and compare an RTL dump.

Examples::

    qs4d golden export --checkpoint runs/qat --out vectors --samples 4 --stress
    qs4d golden export --checkpoint runs/qat --out smoke --samples 1 --steps 16 --trace-acc
    qs4d golden compare vectors --rtl rtl_dump
    qs4d golden compare vectors --rtl core_dump --only 'layers.0.*'

``export`` builds the integer model (docs/integer_spec.md) from the checkpoint
(its own quantization config, or the ``--*_quant`` flags for a float model),
calibrated on ``--calib`` training samples, runs it on the first
``--samples`` test samples and writes ``DIR/manifest.json`` and the ``.memh``
files (weights, inputs, every expected per-step tensor), with ``--stress``
also the stress bundle ``DIR/stress`` (``qs4d_np.golden.stress``), and warns
for every rounding site whose words never tie or clamp. ``compare`` checks
every expected word (``--only``: the matching tensors) against the same file
under ``--rtl``, reports the first mismatch in dataflow order, and exits 1 on
any mismatch, 0 when all agree.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from qs4d_np.cli.common import (CommandError, add_data_flags, add_quant_flags, check_model_fits, check_out_dir,
                                command,
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
    exp.add_argument("--steps", type=positive_int, default=None, metavar="N",
                     help="export for the first N steps of every sequence (short smoke-test vectors; the "
                          "pooling's 1/L is folded for N)")
    exp.add_argument("--stress", type=positive_int, nargs="?", const=16, default=0, metavar="K",
                     help="also write DIR/stress: K (default 16) synthetic samples on a model of this shape, "
                          "widths and grids whose words show exact ties and both rails at every rounding site")
    width = exp.add_argument_group("width control (docs/integer_spec.md, section 2.4)")
    width.add_argument("--max-mult-bits", type=positive_int, default=None, metavar="B",
                       help="every multiplier below 2**B (refused, with the smallest B that works, where the "
                            "multiplier error could exceed 2**-8 LSB)")
    width.add_argument("--shift-per-tensor", action="store_true", help="one shift for every channel of a tensor")
    width.add_argument("--shared-state-step", action="store_true",
                       help="one step for Abar's real and imaginary parts and one for the state's, so the "
                            "3-multiplier complex product is exact")
    exp.add_argument("--trace-acc", action="store_true",
                     help="also write every rounded tensor's accumulator before rounding "
                          "(expected/<tensor>.acc.memh, 64-bit)")
    add_data_flags(exp, train=False)
    add_quant_flags(exp)
    exp.set_defaults(func=run_export)
    cmp = sub.add_parser("compare", help="compare an RTL dump against exported vectors (exit 1 on mismatch)")
    cmp.add_argument("vectors", metavar="DIR", help="directory written by 'qs4d golden export'")
    cmp.add_argument("--rtl", required=True, metavar="DUMPDIR", help="RTL dump with the same file names")
    cmp.add_argument("--show", type=positive_int, default=10, metavar="N", help="mismatches to list")
    cmp.add_argument("--only", default=None, metavar="PATTERN",
                     help="compare only the tensors matching this shell pattern (a partial dump), e.g. "
                          "'layers.0.*', 'layers.1.y', '*.x_re'; the stress bundle's start with 'stress/'")
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
    x, labels = dataset_codes(task.test, np.arange(min(args.samples, len(task.test))))
    if args.steps is not None:
        if args.steps > x.shape[1]:
            raise CommandError(f"--steps {args.steps} exceeds the task's sequence length {x.shape[1]}")
        calib_x, x = calib_x[:, :args.steps], x[:, :args.steps]
    int_model = from_model(model, calib_x, quant=quant_config(args), max_mult_bits=args.max_mult_bits,
                           shift_per_tensor=args.shift_per_tensor, shared_state_step=args.shared_state_step)
    manifest = export_bundle(int_model, x, args.out, labels=labels, stress=args.stress, trace_acc=args.trace_acc)
    sat = sum(sum(d.values()) for d in manifest["saturation"])
    ties = sum(e["ties_even"] + e["ties_odd"] for e in manifest["events"].values())
    print(f"wrote {len(manifest['tensors'])} tensors of {x.shape[0]} sample(s) x {x.shape[1]} steps to "
          f"{args.out} (spec version {manifest['spec_version']}; {sat} saturation event(s), {ties} exact tie(s))")
    print(f"multipliers of at most {manifest['multiplier_bits']} bits, accumulators of at most "
          f"{max(manifest['accumulator_bits'].values())} bits; multiplier error at most "
          f"{max(manifest['eps'].values()):.3g} LSB (bound 2**-8)")
    _warn("the trained model's vectors", manifest["warnings"],
          "" if args.stress else " (add --stress for vectors that exercise them)")
    if args.stress:
        st = manifest["stress"]
        print(f"wrote {st['samples']} stress sample(s) to {args.out}/{st['dir']}")
        _warn("the stress vectors", st["warnings"], " (the RTL's tie rule or clamp is not fully exercised)")
    return 0


def _warn(what: str, warnings: list[str], hint: str) -> None:
    """One stderr warning listing the rounding sites whose words never tie or never clamp."""
    if warnings:
        shown = "; ".join(warnings[:6]) + (f"; and {len(warnings) - 6} more" if len(warnings) > 6 else "")
        print(f"warning: {what} never show the tie rule or a clamp at {len(warnings)} rounding site(s){hint}: "
              f"{shown}", file=sys.stderr)


@command("golden compare")
def run_compare(args: argparse.Namespace) -> int:
    from qs4d_np.golden.compare import compare_dumps

    report = compare_dumps(args.vectors, args.rtl, only=args.only)
    print(report.summary(args.show))
    return 0 if report.ok else 1
