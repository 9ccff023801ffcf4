"""Crossbar MVM batches next to PyTorch in one process: Numba's and torch's thread pools.

A notebook that compares against PyTorch imports torch first and alternates torch ops with
ours. Each configuration runs in a fresh process (the threading layer is fixed at Numba's
first parallel launch): median wall time of ``--calls`` noisy MVM batches (1024 x 256 on a
256 x 256 array, every non-ideality on), with a torch 256 x 256 matmul before each call when
torch is in the configuration. The configurations are interleaved over ``--rounds`` process
launches, so a load spike on a shared machine hits them alike; printed: the median over
rounds and the range.

    .venv/bin/python benchmarks/bench_threads.py [--rounds 7] [--calls 30]

torch is optional: without it only the configuration without torch runs. qs4d_np picks Numba's
layer on import (``qs4d_np.kernels.threads``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

# name -> (environment, import torch first). NUMBA_THREADING_LAYER=omp is Numba's own choice on a
# machine without TBB, which qs4d_np keeps when the user sets it.
CONFIGS = {
    "no torch, qs4d_np's layer choice": ({}, False),
    "torch first, NUMBA_THREADING_LAYER=omp": ({"NUMBA_THREADING_LAYER": "omp"}, True),
    "torch first, qs4d_np's layer choice": ({}, True),
}


def child(calls: int, with_torch: bool) -> None:
    if with_torch:
        import torch
        a = torch.randn(256, 256)
    import numba
    import numpy as np

    from qs4d_np.hardware import CrossbarConfig, program
    rng = np.random.default_rng(0)
    W = rng.standard_normal((256, 256)).astype(np.float32)
    x = rng.standard_normal((1024, 256)).astype(np.float32)
    array = program(W, CrossbarConfig.realistic(w_noise=0.02, g_levels=256, ir_drop=1.75e-6), seed=1)
    array.mvm(x)  # compile, start the pools
    times = []
    for _ in range(calls):
        if with_torch:
            float((a @ a).sum())
        t0 = time.perf_counter()
        array.mvm(x)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"ms": 1e3 * float(np.median(times)), "layer": numba.threading_layer(),
                      "threads": numba.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--child", choices=("plain", "torch"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.calls, args.child == "torch")
        return
    have_torch = importlib.util.find_spec("torch") is not None
    configs = {k: v for k, v in CONFIGS.items() if have_torch or not v[1]}
    if not have_torch:
        print("torch is not installed: only the configurations without it run")
    results: dict[str, list[float]] = {name: [] for name in configs}
    layers: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, (env, with_torch) in configs.items():
            out = subprocess.run([sys.executable, __file__, "--child", "torch" if with_torch else "plain",
                                  "--calls", str(args.calls)], env={**os.environ, **env}, check=True,
                                 capture_output=True, text=True).stdout
            record = json.loads(out.strip().splitlines()[-1])
            results[name].append(record["ms"])
            layers[name] = f"{record['layer']}, {record['threads']} threads"
    load = os.getloadavg()
    print(f"{args.rounds} rounds x {args.calls} calls, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'configuration':48s} {'median ms':>10s} {'min':>8s} {'max':>8s}  numba layer")
    for name, values in results.items():
        values = sorted(values)
        print(f"{name:48s} {values[len(values) // 2]:10.2f} {values[0]:8.2f} {values[-1]:8.2f}  {layers[name]}")


if __name__ == "__main__":
    main()
