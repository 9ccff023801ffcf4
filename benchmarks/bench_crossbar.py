"""Noisy 256 x 256 crossbar MVMs vs a plain NumPy float matmul of the same shapes.

Target (issue 6): a batch of noisy MVMs with every non-ideality on costs at
most 3x the float32 NumPy matmul, measured in the same run. Prints the median
of several interleaved runs of each, the ratio, and the machine load.

    .venv/bin/python benchmarks/bench_crossbar.py [--batch 1024] [--repeats 9] [--threads 1]

``--threads n`` pins both BLAS and Numba to n threads (set before NumPy is
imported), which makes the comparison fair on a machine shared with other jobs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="BLAS and Numba threads (default: all)")
    return parser.parse_args(argv)


ARGS = parse_args(sys.argv[1:])
if ARGS.threads is not None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numba  # noqa: E402  (after the thread settings)
import numpy as np  # noqa: E402

from qs4d_np.hardware import CrossbarConfig, program  # noqa: E402


def every_nonideality(w_noise_type: str) -> CrossbarConfig:
    """DAC 7 bit, ADC 9 bit, noise and bound management, 0.06 output noise, 2% weight
    read noise, PCM programming noise, 256 conductance levels, IR drop (rho = 1.75e-6)."""
    return CrossbarConfig.realistic(w_noise=0.02, w_noise_type=w_noise_type, g_levels=256, ir_drop=1.75e-6)


def run_ms(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU (all threads of this process) milliseconds of ``repeats`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return 1e3 * float(np.median(wall)), 1e3 * float(np.median(cpu))


def main(args: argparse.Namespace) -> None:

    rng = np.random.default_rng(0)
    W = rng.standard_normal((args.size, args.size)).astype(np.float32)
    x = rng.standard_normal((args.batch, args.size)).astype(np.float32)
    W64, x64 = W.astype(np.float64), x.astype(np.float64)
    t0 = time.perf_counter()
    arrays = {kind: program(W, every_nonideality(kind), seed=1) for kind in ("additive", "proportional")}
    program_ms = 1e3 * (time.perf_counter() - t0) / 2
    for arr in arrays.values():  # compile and warm up
        arr.mvm(x)

    print(f"batch {args.batch} x ({args.size} x {args.size}), threads {args.threads or 'all'} "
          f"(numba {numba.get_num_threads()}), "
          f"load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    rounds = {"numpy float32 x @ W.T": lambda: x @ W.T, "numpy float64 x @ W.T": lambda: x64 @ W64.T}
    rounds.update({f"crossbar, {k} weight read noise": (lambda a=a: a.mvm(x)) for k, a in arrays.items()})
    # interleave the candidates so a load spike hits all of them alike
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in rounds}
    for _ in range(args.repeats):
        for name, fn in rounds.items():
            samples[name].append(run_ms(fn, 3))
    wall = {name: float(np.median([s[0] for s in v])) for name, v in samples.items()}
    cpu = {name: float(np.median([s[1] for s in v])) for name, v in samples.items()}
    base = "numpy float32 x @ W.T"
    print(f"{'median of ' + str(args.repeats) + ' x (median of 3)':45s} {'wall ms':>9s} {'ratio':>6s} {'cpu ms':>9s} {'ratio':>6s}")
    for name in rounds:
        print(f"{name:45s} {wall[name]:9.3f} {wall[name] / wall[base]:5.2f}x {cpu[name]:9.3f} "
              f"{cpu[name] / cpu[base]:5.2f}x")
    print(f"programming one {args.size} x {args.size} array (PCM noise, levels, IR drop): {program_ms:.1f} ms")
    for kind, arr in arrays.items():
        arr.mvm(x)
        print(f"{kind}: clipped outputs {arr.stats.clipped_outputs}, bound-management retries {arr.stats.bm_retries}")
    ratio = wall["crossbar, additive weight read noise"] / wall[base]
    print(f"target <= 3x float32 matmul, wall time, additive read noise: "
          f"{'met' if ratio <= 3 else 'NOT met'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main(ARGS)
