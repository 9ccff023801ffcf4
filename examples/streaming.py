"""Stream sequential-MNIST digits through an S4DModel one pixel per step and watch the prediction settle.

Takes a model (``--checkpoint``: a ``qs4d train`` run directory or a saved model;
default: a small freshly initialised s4d-example model, whose predictions show the
mechanics but mean nothing), optionally quantizes it (``--bits``: every target at
2**bits levels, state and act ranges calibrated on a few training digits in
recurrent mode, i.e. PTQ), freezes it with ``model.stream()`` and feeds ``--digits``
test digits (offline 5k subset when nothing else is there; ``--random`` for random
input) one pixel per time step. Prints the predicted class and its probability per
digit as the pixels arrive and the per-step latency, and checks the streamed logits
against the forward on the pixels seen so far (``forward(x[:, :t+1],
mode="recurrent")``) at every printed step::

    .venv/bin/python examples/streaming.py                                # a few seconds
    .venv/bin/python examples/streaming.py --checkpoint runs/float --bits 8
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import numpy as np

from qs4d_np.cli.common import load_model
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant import QuantConfig
from qs4d_np.train.ptq import ptq

RUNNING = {"act": {"scale_mode": "running"}, "state": {"scale_mode": "running"}}
# Streamed logits against the prefix forward, relative to max(1, |logits|). Float: a few ulp
# (BLAS row counts, the scan's reassociated sums; tests/test_streaming.py). Quantized float32:
# where such an ulp moves a value across a rounding edge a state / act code moves by one step,
# which moves the logits by about one step of an 8-bit grid at most: 1e-2 still catches a wrong
# stream (a missing norm or residual, a stale state) by orders of magnitude.
TOLERANCE = 1e-2


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def inputs(args: argparse.Namespace, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (digits, L, 1), labels (or -1), calibration batch) from MNIST or random input."""
    if args.random:
        x = rng.standard_normal((args.digits + 16, args.length, 1)).astype(np.float32)
        return x[:args.digits], np.full(args.digits, -1), x[args.digits:]
    from qs4d_np.data.tasks import load_task
    task = load_task("smnist", args.data_dir)
    x, y = task.test.batch(rng.choice(len(task.test), args.digits, replace=False))
    calib, _ = task.train.batch(rng.choice(len(task.train), min(16, len(task.train)), replace=False))
    return x, y, calib


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a qs4d train run directory or saved model")
    parser.add_argument("--bits", type=int, default=0, help="quantize every target to 2**bits levels (0: float)")
    parser.add_argument("--digits", type=int, default=4, help="sequences streamed side by side (the batch)")
    parser.add_argument("--data-dir", default=None, help="MNIST IDX files (default: cache, download, 5k subset)")
    parser.add_argument("--random", action="store_true", help="random input instead of digits")
    parser.add_argument("--length", type=int, default=784, help="sequence length of --random input")
    parser.add_argument("--prints", type=int, default=8, help="how many steps to print (and check)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (min(args.digits, args.prints, args.length) < 1 or args.seed < 0
            or not (args.bits == 0 or 2 <= args.bits <= 16)):
        parser.error(f"--digits, --prints, --length must be >= 1, --seed >= 0 and --bits 0 or 2..16, got "
                     f"{args.digits}, {args.prints}, {args.length}, {args.seed}, {args.bits}")
    rng = np.random.default_rng(args.seed)
    try:
        x, labels, calib = inputs(args, rng)
        model = (load_model(args.checkpoint) if args.checkpoint else
                 S4DModel.from_preset("s4d-example", 1, 10, d_model=32, d_state=16, n_layers=2, seed=args.seed))
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"streaming.py: error: {exc}", file=sys.stderr)
        return 1
    if x.shape[2] != model.d_input:
        print(f"streaming.py: error: the model takes {model.d_input} input channels, the data has {x.shape[2]}",
              file=sys.stderr)
        return 1
    if args.bits:
        model = ptq(model, QuantConfig(2 ** args.bits, target_options=RUNNING), [calib], mode="recurrent")
    c = model.config
    print(f"model: {args.checkpoint or 'initialised s4d-example'} ({c['n_layers']} x {c['d_model']}, "
          f"N = {c['d_state']}, {'float' if not args.bits else f'{args.bits}-bit PTQ'}); "
          f"{'random input' if args.random else 'digits ' + ' '.join(map(str, labels))}")

    L = x.shape[1]
    shown = set(np.linspace(0, L - 1, args.prints).round().astype(int).tolist())
    try:
        stream = model.stream()  # refuses data-dependent (absmax) ranges, naming the layer
    except ValueError as exc:
        print(f"streaming.py: error: {exc}", file=sys.stderr)
        return 1
    state = stream.initial_state(len(x))
    worst, elapsed = 0.0, 0.0
    print(f"{'step':>5} {'seen':>5}  " + "  ".join(f"{'seq ' + str(i):>10}" for i in range(len(x))))
    for t in range(L):
        t0 = time.perf_counter()
        logits, state = stream.step(x[:, t], state)
        elapsed += time.perf_counter() - t0
        if t in shown:
            p = softmax(logits.astype(np.float64))
            print(f"{t + 1:>5} {(t + 1) / L:>5.0%}  "
                  + "  ".join(f"{k:>4d} ({p[i, k]:.2f})" for i, k in enumerate(p.argmax(axis=1))))
            want = model.forward(x[:, :t + 1], mode="recurrent")
            worst = max(worst, float(np.abs(logits - want).max() / max(1.0, np.abs(want).max())))
    if not args.random:
        print(f"labels       " + "  ".join(f"{k:>10d}" for k in labels))
    print(f"stream: {1e3 * elapsed / L:.3f} ms per step (batch {len(x)}); streamed logits vs the forward on "
          f"the pixels seen so far: max relative difference {worst:.2e} (tolerance {TOLERANCE:g})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
