"""``qs4d metrics``: hardware cost of a model: the QS4D formulas and the counted IMSSA datapath.

Examples::

    qs4d metrics --checkpoint runs/qat4                       # bits from the model's quantization
    qs4d metrics --checkpoint runs/float --bits 8             # the same weights costed at 8 bits
    qs4d metrics --d_model 128 --d_state 128 --n_layers 4 --bits 12 --compat qs4d   # the reference's log
    qs4d metrics --d_model_m 128 --d_state 128 --n_layers_m 4 --all_quant 4096      # the same, train's spellings

Prints, next to the float32 baseline and the reduction: ACE (with and without
r_dt), model size and ADC complexity by the QS4D formulas (``--compat qs4d``
keeps the reference's decoder term, the default corrects it), then the same
figures counted from the model's datapath on the IMSSA mapping (MACs by
operand widths, bits stored, ADC conversions and bits per time step), where
pruned modes, channels and all-zero weight rows / columns are left out
(``qs4d_np.hardware.datapath``). ``--json`` prints the table as JSON.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from qs4d_np.cli.common import check_memory, command, levels_type, load_model, positive_int
from qs4d_np.hardware.datapath import bit_widths, metrics_table
from qs4d_np.hardware.metrics import COMPAT, FLOAT_BITS, BitWidths
from qs4d_np.models.memory import estimate as estimate_memory
from qs4d_np.models.s4d_model import S4DModel

LABELS = {"ace": "ACE", "ace_without_dt": "ACE without r_dt", "model_size_bits": "model size (bits)",
          "adc": "ADC complexity", "bit_ops": "bit-weighted MACs", "bits_stored": "bits stored",
          "adc_conversions": "ADC conversions", "adc_bits": "ADC bits"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("metrics", help="hardware cost metrics (QS4D formulas, counted datapath)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, metavar="CKPT",
                        help="a run directory or a saved model; without it, a model of the shape flags")
    shape = parser.add_argument_group("shape without --checkpoint (defaults: the 4 x 128, N = 64 model)")
    # the spellings of qs4d train (--d_model_m, --n_layers_m, --all_quant) are accepted too
    shape.add_argument("--d_model", "--d_model_m", dest="d_model", type=positive_int, default=None, metavar="H")
    shape.add_argument("--d_state", type=even_int, default=None, metavar="N", help="state size (reals, even)")
    shape.add_argument("--n_layers", "--n_layers_m", dest="n_layers", type=positive_int, default=None, metavar="N")
    shape.add_argument("--d_input", type=positive_int, default=None)
    shape.add_argument("--d_output", type=positive_int, default=None)
    widths = parser.add_mutually_exclusive_group()
    widths.add_argument("--bits", type=bits_type, default=None, metavar="B",
                        help="every target at B bits, 1..32 (default: the checkpoint's quantization, else float32)")
    widths.add_argument("--all_quant", dest="bits", type=levels_as_bits, default=None, metavar="N",
                        help="as qs4d train: every target with N = 2**B quantization states (--bits B)")
    parser.add_argument("--compat", choices=COMPAT, default="corrected",
                        help="qs4d: the reference's model-size formula (decoder written as H*d_in)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run, parser_error=parser.error)


def bits_type(text: str) -> int:
    value = positive_int(text)
    if value > FLOAT_BITS:
        raise argparse.ArgumentTypeError(f"expected bits in 1..{FLOAT_BITS}, got {value}")
    return value


def even_int(text: str) -> int:
    value = positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"expected an even state size (N/2 complex modes), got {value}")
    return value


def levels_as_bits(text: str) -> int:
    """``--all_quant N`` (N quantization states, a power of two) as a bit width."""
    levels = levels_type(text)
    bits = levels.bit_length() - 1
    if levels != 2 ** bits or bits > FLOAT_BITS:
        raise argparse.ArgumentTypeError(f"expected 2**B quantization states with B in 1..{FLOAT_BITS}, got {levels}")
    return bits


SHAPE_DEFAULTS = {"d_model": 128, "d_state": 64, "n_layers": 4, "d_input": 1, "d_output": 10}


def _model(args: argparse.Namespace) -> S4DModel:
    given = [f"--{k}" for k in SHAPE_DEFAULTS if getattr(args, k) is not None]
    if args.checkpoint is not None:
        if given:
            args.parser_error(f"{', '.join(given)} cannot be combined with --checkpoint (the model has its shape)")
        return load_model(args.checkpoint)
    shape = {k: SHAPE_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k) for k in SHAPE_DEFAULTS}
    vars(args).update(shape)
    check_memory("the model", {k: shape[k] for k in ("n_layers", "d_model", "d_state")},
                 estimate_memory(shape["d_input"], shape["d_output"], shape["d_model"], shape["d_state"],
                                 shape["n_layers"]))
    return S4DModel(shape["d_input"], shape["d_output"], d_model=shape["d_model"], d_state=shape["d_state"],
                    n_layers=shape["n_layers"], dropout=0.0, seed=0)


def _bits(args: argparse.Namespace, model: S4DModel) -> list[BitWidths]:
    if args.bits is not None:
        return [BitWidths.uniform(args.bits)] * len(model.blocks)
    quant = getattr(model, "quant", None)
    learn_B = bool(model.config.get("learn_B", False))
    return [bit_widths(quant, i, learn_B=learn_B) for i in range(len(model.blocks))]


def _table(result: dict[str, Any], bits: list[BitWidths], source: str) -> str:
    lines = [f"model: {source}",
             "bits per layer: " + "; ".join(
                 " ".join(f"{k}={v}" for k, v in vars(b).items()) for b in dict.fromkeys(bits)),
             f"QS4D formulas (compat={result['compat']}):"]
    width = max(len(v) for v in LABELS.values())
    header = f"  {'':<{width}} {'float32':>16} {'this model':>16} {'reduction':>10}"
    lines.append(header)
    for key, row in result["formulas"].items():
        lines.append(f"  {LABELS[key]:<{width}} {row['baseline']:>16,} {row['quantized']:>16,} "
                     f"{row['reduction']:>9.2f}x")
    lines.append("counted datapath (IMSSA mapping, per time step, pruned parts removed):")
    lines.append(header)
    for key in ("bit_ops", "bits_stored", "adc_conversions", "adc_bits"):
        row = result["datapath"][key]
        lines.append(f"  {LABELS[key]:<{width}} {row['baseline']:>16,} {row['quantized']:>16,} "
                     f"{row['reduction']:>9.2f}x")
    macs = result["datapath"]["macs"]
    lines.append(f"  MACs: {macs['total']:,} (weight bits x input bits: "
                 + ", ".join(f"{k}: {n:,}" for k, n in macs["by_widths"].items()) + ")")
    return "\n".join(lines)


@command("metrics")
def run(args: argparse.Namespace) -> int:
    model = _model(args)
    bits = _bits(args, model)
    result = metrics_table(model, bits, compat=args.compat)
    source = args.checkpoint if args.checkpoint is not None else (
        f"H={args.d_model}, N={args.d_state}, {args.n_layers} layers, d_in={args.d_input}, d_out={args.d_output}")
    if args.json:
        print(json.dumps({"model": source, "bits": [vars(b) for b in bits], **result}, indent=2))
    else:
        print(_table(result, bits, source))
    return 0
