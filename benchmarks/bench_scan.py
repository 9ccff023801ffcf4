"""Time one S4D SSM core (no activation/mixing) in both modes, float32.

Prints the median of --repeats runs (wall clock and process CPU time, which
sums both threads) for conv forward, conv backward, scan forward and scan
backward, and the scan throughput in mode-updates/s. The machine is shared,
so the load average is printed too.

    .venv/bin/python benchmarks/bench_scan.py [--batch 64 --length 784 --d-model 128 --d-state 64]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from qs4d_np import S4D


def median_time(fn, repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)), float(np.median(cpus))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=784)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-state", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    layer = S4D(args.d_model, args.d_state, activation=None, mixing=None, seed=0)
    rng = np.random.default_rng(1)
    shape = (args.batch, args.length, args.d_model)
    u = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    updates = args.batch * args.length * args.d_model * (args.d_state // 2)

    print(f"S4D core float32, batch {args.batch}, L {args.length}, H {args.d_model}, N {args.d_state}; "
          f"median of {args.repeats}; load average {os.getloadavg()[0]:.2f} at start")
    for mode in ("conv", "recurrent"):
        layer.forward(u[:1, :8], training=True, mode=mode)  # compile / warm up
        layer.backward(dy[:1, :8])
        fwd = median_time(lambda: layer.forward(u, training=True, mode=mode), args.repeats)
        layer.forward(u, training=True, mode=mode)
        bwd = median_time(lambda: layer.backward(dy), args.repeats)
        for phase, (wall, cpu) in (("forward", fwd), ("backward", bwd)):
            rate = f"  {updates / wall / 1e9:.2f} G mode-updates/s" if mode == "recurrent" else ""
            print(f"{mode:9s} {phase:8s} wall {wall:7.3f} s  cpu {cpu:7.3f} s{rate}")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
