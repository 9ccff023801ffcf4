"""Whole-model analog inference (IMSSA mapping on simulated crossbars) in samples/s.

Runs ``AnalogModel.forward`` on sMNIST-length inputs (L = 784, the offline
test digits) for a small model and the 4 x 128 (N = 64) QS4D model, under
three crossbar configurations (ideal; the default converters without noise;
``CrossbarConfig.realistic()``), next to the float model's own recurrent
forward. Prints the median of ``--repeats`` runs and the machine load. The
state is clipped at 1e4 (``state_bound``): the realistic noise lets slowly
decaying modes grow (see ``AnalogModel``), and clipping costs next to nothing.

    .venv/bin/python benchmarks/bench_analog.py [--batch 64] [--repeats 3] [--large-batch 16]
        [--large-repeats 1] [--length 784] [--threads 1] [--skip-large]
"""
from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from qs4d_np.data.tasks import load_task
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.imssa import AnalogModel
from qs4d_np.models.s4d_model import S4DModel

CONFIGS = {"ideal": CrossbarConfig.ideal(), "converters": CrossbarConfig(), "realistic": CrossbarConfig.realistic()}


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench(name: str, model: S4DModel, x: np.ndarray, repeats: int) -> None:
    batch = x.shape[0]
    model.forward(x[:, :4], mode="recurrent")  # compile
    t = median_seconds(lambda: model.forward(x, mode="recurrent"), repeats)
    print(f"{name:>14} | {'float recurrent':>15} | {batch / t:9.2f} samples/s | {t:8.2f} s/batch")
    for cfg_name, cfg in CONFIGS.items():
        analog = AnalogModel(model, cfg, seed=0, state_bound=1e4)
        analog.forward(x[:, :4])  # compile the kernels outside the timing
        t = median_seconds(lambda: analog.forward(x), repeats)
        print(f"{name:>14} | {cfg_name:>15} | {batch / t:9.2f} samples/s | {t:8.2f} s/batch | "
              f"{analog.n_tiles} arrays")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="batch of the small model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large-batch", type=int, default=16, help="batch of the 4 x 128 model")
    parser.add_argument("--large-repeats", type=int, default=1)
    parser.add_argument("--length", type=int, default=784)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="BLAS and Numba threads (default: all)")
    args = parser.parse_args()
    if args.threads is None:
        run(args)
        return
    numba.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:
    task = load_task("smnist")
    n = max(args.batch, args.large_batch)
    x, _ = task.test.batch(np.arange(n))
    x = x[:, :args.length]
    print(f"load average before: {os.getloadavg()}; L = {x.shape[1]}; threads: {args.threads or 'all'}")
    small = S4DModel.from_preset("qs4d", 1, 10, d_model=32, d_state=16, n_layers=2, seed=0)
    bench("2 x 32, N=16", small, x[:args.batch], args.repeats)
    if not args.skip_large:
        large = S4DModel.from_preset("qs4d", 1, 10, seed=0)
        bench("4 x 128, N=64", large, x[:args.large_batch], args.large_repeats)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
