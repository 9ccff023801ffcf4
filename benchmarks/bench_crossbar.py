"""Noisy 256 x 256 crossbar MVMs vs a plain NumPy float matmul of the same shapes.

Target (issue 6): a batch of noisy MVMs with every non-ideality on costs at
most 3x the float32 NumPy matmul, measured in the same run. Prints the median
of several interleaved runs of each, the ratio, and the machine load.

    .venv/bin/python benchmarks/bench_crossbar.py [--batch 1024] [--repeats 9]
"""
from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np

from qs4d_np.hardware import CrossbarConfig, program


def every_nonideality(w_noise_type: str) -> CrossbarConfig:
    """DAC 7 bit, ADC 9 bit, noise and bound management, 0.06 output noise, 2% weight
    read noise, PCM programming noise, 256 conductance levels, IR drop (rho = 1.75e-6)."""
    return CrossbarConfig.realistic(w_noise=0.02, w_noise_type=w_noise_type, g_levels=256, ir_drop=1.75e-6)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    W = rng.standard_normal((args.size, args.size)).astype(np.float32)
    x = rng.standard_normal((args.batch, args.size)).astype(np.float32)
    W64, x64 = W.astype(np.float64), x.astype(np.float64)
    arrays = {kind: program(W, every_nonideality(kind), seed=1) for kind in ("additive", "proportional")}
    for arr in arrays.values():  # compile and warm up
        arr.mvm(x)

    print(f"batch {args.batch} x ({args.size} x {args.size}), numba threads {numba.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    rounds = {"numpy float32 x @ W.T": lambda: x @ W.T, "numpy float64 x @ W.T": lambda: x64 @ W64.T}
    rounds.update({f"crossbar, {k} weight read noise": (lambda a=a: a.mvm(x)) for k, a in arrays.items()})
    # interleave the candidates so a load spike hits all of them alike
    samples: dict[str, list[float]] = {name: [] for name in rounds}
    for _ in range(args.repeats):
        for name, fn in rounds.items():
            samples[name].append(median_ms(fn, 3))
    medians = {name: float(np.median(v)) for name, v in samples.items()}
    base = medians["numpy float32 x @ W.T"]
    for name, ms in medians.items():
        print(f"{name:45s} {ms:8.3f} ms   {ms / base:5.2f}x float32 matmul")
    for kind, arr in arrays.items():
        arr.mvm(x)
        print(f"{kind}: clipped outputs {arr.stats.clipped_outputs}, bound-management retries {arr.stats.bm_retries}")
    ratio = medians["crossbar, additive weight read noise"] / base
    print(f"target <= 3x float32 matmul (additive read noise): {'met' if ratio <= 3 else 'NOT met'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
