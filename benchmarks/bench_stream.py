"""Per-step latency of streaming a whole S4DModel (one input sample per time step).

Model: the s4d-example preset (4 x 128, N = 64, GLU mixing, LayerNorm), d_input 1,
10 classes, float32; float and QAT at ``--bits`` (default 8) on every target with
running state / act ranges calibrated in recurrent mode. Paths:

* ``model.step`` (per call): ``S4DModel.step(x_t, state)``, which derives every
  layer's (quantized) parameters, state quantizer and act scales anew on each call;
* ``stream.step``: ``stream = model.stream()`` built once (its build time is printed
  too), then only the step's arithmetic;
* ``forward / L``: one whole-sequence recurrent forward of ``--length`` steps divided
  by the length, for scale (a forward cannot give a prediction per step without
  re-running the prefix).

The cases are interleaved per round so a change of load on the shared machine hits
them alike; each prints the median over ``--repeats`` rounds of the mean step time
within a round (``--steps`` steps), and the 1-minute load average.

    python benchmarks/bench_stream.py                 # batch 1 and 16, 7 rounds
    python benchmarks/bench_stream.py --batch 1 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=20, help="steps timed per round and path")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--length", type=int, default=100, help="sequence length of the forward for scale")
    parser.add_argument("--bits", type=int, default=8)
    args = parser.parse_args(argv)
    if min(*args.batch, args.steps, args.repeats, args.length) < 1 or not 2 <= args.bits <= 16:
        parser.error(f"--batch, --steps, --repeats, --length must be >= 1 and 2 <= --bits <= 16, got "
                     f"{args.batch}, {args.steps}, {args.repeats}, {args.length}, {args.bits}")

    from qs4d_np.models.s4d_model import S4DModel
    from qs4d_np.quant import QuantConfig
    from qs4d_np.train.ptq import calibrate

    rng = np.random.default_rng(0)
    running = {"act": {"scale_mode": "running"}, "state": {"scale_mode": "running"}}
    qat = S4DModel.from_preset("s4d-example", 1, 10, seed=0,
                               quant=QuantConfig(2 ** args.bits, target_options=running))
    calibrate(qat, [rng.standard_normal((8, args.length, 1)).astype(np.float32)], mode="recurrent")
    models = {"float": S4DModel.from_preset("s4d-example", 1, 10, seed=0), f"QAT {args.bits} bits": qat}

    for batch in args.batch:
        x = rng.standard_normal((batch, args.length, 1)).astype(np.float32)
        x_t = x[:, 0]

        def stepping(step: Callable, state: Any) -> float:
            """Mean time of ``--steps`` calls of step(x_t, state) -> (logits, state)."""
            t0 = time.perf_counter()
            for _ in range(args.steps):
                _, state = step(x_t, state)
            return (time.perf_counter() - t0) / args.steps

        def build(model: S4DModel) -> float:
            t0 = time.perf_counter()
            model.stream()
            return time.perf_counter() - t0

        def forward(model: S4DModel) -> float:
            t0 = time.perf_counter()
            model.forward(x, mode="recurrent")
            return (time.perf_counter() - t0) / args.length

        paths = {"model.step (per call)": lambda m: stepping(m.step, m.initial_state(batch)),
                 "stream.step": lambda m: stepping(m.stream().step, m.initial_state(batch)),
                 "stream() build": build,
                 f"forward / L (L = {args.length})": forward}
        times: dict[tuple[str, str], list[float]] = {(m, p): [] for m in models for p in paths}
        loads = []
        for round_ in range(args.repeats + 1):  # round 0 warms up (Numba compilation, BLAS pool)
            for m, model in models.items():
                for p, fn in paths.items():
                    t = fn(model)
                    if round_:
                        times[m, p].append(t)
            loads.append(os.getloadavg()[0])
        print(f"== streaming s4d-example 4 x 128, N = 64, batch {batch}, float32: median of {args.repeats} "
              f"interleaved rounds (1-min load {min(loads):.2f}..{max(loads):.2f}) ==")
        for (m, p), ts in times.items():
            print(f"{m:12s} {p:28s} {1e3 * np.median(ts):9.3f} ms{'' if 'build' in p else ' per step'}")
        print()


if __name__ == "__main__":
    main()
