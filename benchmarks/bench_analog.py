"""Whole-model analog inference (``hardware.to_analog``, IMSSA arrays) in samples/s, next to the digital
recurrent forward of the same model in the same run.

For each model (the demo size, qs4d preset 4 x 64 with N = 64, and 4 x 128 with N = 64, or a
saved model with ``--checkpoint``) and each crossbar configuration (``ideal``; ``converters``:
the default 7-bit DAC / 9-bit ADC without noise; ``realistic``: ``CrossbarConfig.realistic()``;
``realistic, increment``: the same noise with ``state_update="increment"``, per-row weights,
8-bit DAC / 10-bit ADC on fixed calibrated grids, which runs every sample to the end),
all calibrated on ``--calib`` training digits, it times ``forward`` on ``--batch`` offline
sMNIST test digits (L = 784) and prints the median of ``--repeats`` runs, the slowdown against
the digital recurrent forward, and how many samples overflowed (an overflowing sample stops
early, which makes a run faster: read samples/s together with it). Programming and
calibration are not timed. Prints the machine load before and after.

    .venv/bin/python benchmarks/bench_analog.py [--batch 32] [--repeats 3] [--threads 2]
        [--checkpoint RUN_DIR] [--skip-large] [--length 784]
"""
from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np
from threadpoolctl import threadpool_limits

from qs4d_np.data.tasks import load_task
from qs4d_np.hardware import CrossbarConfig, analog_parts, to_analog
from qs4d_np.hardware.imssa import AnalogSSMCore
from qs4d_np.models.s4d_model import S4DModel

CONFIGS = {"ideal": CrossbarConfig.ideal(), "converters": CrossbarConfig(), "realistic": CrossbarConfig.realistic(),
           # realistic()'s read and programming noise on the mapping that keeps a recurrence stable under
           # it (increment state update, per-row weights, fixed calibrated grids): every sample runs all
           # L steps, so this row times the noisy kernel on full runs
           "realistic, increment": CrossbarConfig.realistic(dac_bits=8, adc_bits=10, noise_management="none",
                                                            bound_management=False, calib_margin=1.25,
                                                            state_update="increment", weight_scaling="output")}


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench(name: str, model: S4DModel, x: np.ndarray, calib: np.ndarray, repeats: int) -> None:
    batch = x.shape[0]
    model.forward(x[:2, :4], mode="recurrent")  # compile
    digital = median_seconds(lambda: model.forward(x, mode="recurrent"), repeats)
    print(f"{name:>14} | {'digital recurrent':>20} | {batch / digital:8.2f} samples/s |")
    for cfg_name, cfg in CONFIGS.items():
        analog = to_analog(model, cfg, seed=0, calib=calib)
        analog.forward(x[:2, :4])  # compile the kernels outside the timing
        t = median_seconds(lambda: analog.forward(x), repeats)
        overflowed = np.zeros(batch, dtype=bool)
        for core in (p for p in analog_parts(analog) if isinstance(p, AnalogSSMCore)):
            overflowed |= core.last_overflow >= 0
        print(f"{name:>14} | {cfg_name:>20} | {batch / t:8.2f} samples/s | {t / digital:6.1f}x digital | "
              f"{int(overflowed.sum())}/{batch} overflowed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib", type=int, default=64, help="training digits to calibrate on")
    parser.add_argument("--length", type=int, default=784)
    parser.add_argument("--checkpoint", default=None, help="also time this saved model (run directory)")
    parser.add_argument("--skip-large", action="store_true", help="skip the 4 x 128 model")
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
    x, _ = task.test.batch(np.arange(args.batch))
    calib, _ = task.train.batch(np.arange(args.calib))
    x, calib = x[:, :args.length], calib[:, :args.length]
    print(f"load average before: {os.getloadavg()}; L = {x.shape[1]}; batch {args.batch}; "
          f"threads: {args.threads or numba.get_num_threads()}")
    if args.checkpoint is not None:
        from qs4d_np.cli.common import load_model
        bench("checkpoint", load_model(args.checkpoint), x, calib, args.repeats)
    bench("4 x 64, N=64", S4DModel.from_preset("qs4d", 1, 10, d_model=64, seed=0), x, calib, args.repeats)
    if not args.skip_large:
        bench("4 x 128, N=64", S4DModel.from_preset("qs4d", 1, 10, seed=0), x, calib, args.repeats)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
