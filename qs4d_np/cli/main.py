"""Entry point of the ``qs4d`` command line.

Each subcommand group lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser(s) and sets ``func`` (a
callable taking the parsed namespace and returning an exit status).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# Modules of qs4d_np.cli, in the order their commands appear in --help.
COMMAND_MODULES: tuple[str, ...] = ("train", "evaluate", "noise", "ptq", "plot", "metrics", "golden", "sweep",
                                     "prune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qs4d", description="Quantization-aware training of S4D models, integer golden model, crossbar studies.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"qs4d_np.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
