"""Integer golden model: inference throughput, and agreement with the QAT model it came from.

Throughput (default): a QS4D-preset model (``--layers`` x ``--H``, state size
``--N``) quantized with 256 levels everywhere and 4096 for the state,
exported to the integer model and run in streaming order on ``--batch``
sMNIST-length (784-step) random pixel sequences, ``--repeats`` times;
with the Numba layer kernel (``--kernel numba``, default) or the
NumPy streaming path (``--kernel numpy``); prints the median wall time, samples/s, integer MACs/s and the extrapolated
time for the 10,000-sample test set, at the machine's current load and, from
the CPU time per sample, for two idle cores. The MAC count per sample and step is
the integer multiplies of docs/integer_spec.md section 5 (state: 4 Abar and
2 Bbar products plus 6 multiplier products per mode; readout 2 per mode plus
3; mixing 2*H*H plus 2H; GLU 2H; post 2H), times L and the layers.

Agreement (``--agreement CKPT``): a trained QAT model (``S4DModel.save``
prefix or run directory) exported with its own quantizers, calibrated on 64
training samples, then ``measure_agreement`` on the first ``--test`` test
samples: integer vs the float64 twin and vs the QAT model's recurrent
evaluation forward (prediction agreement, accuracies), and the local bound
of every traced tensor on the first 4 samples. Prints JSON.

    python benchmarks/bench_golden.py --batch 8 --repeats 3
    python benchmarks/bench_golden.py --agreement runs/qat --test 1000
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numba
import numpy as np

from qs4d_np.golden.agreement import measure_agreement
from qs4d_np.golden.bundle import dataset_codes
from qs4d_np.golden.export import from_model
from qs4d_np.golden.fast import run_fast
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.config import QuantConfig

L_SMNIST = 784
TEST_SET = 10_000


def macs_per_sample(model, L: int) -> int:
    per_step = 0
    for layer in model.layers:
        H, N2 = layer.core.H, layer.core.N2
        per_step += 12 * H * N2 + 2 * H * N2 + 3 * H + 2 * H * H + 2 * H + 2 * H + 2 * H
    return per_step * L


def throughput(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    model = S4DModel.from_preset("qs4d", 1, 10, d_model=args.H, d_state=args.N, n_layers=args.layers, dropout=0.0,
                                 seed=0)
    calib = rng.integers(0, 256, (4, L_SMNIST, 1))
    int_model = from_model(model, calib / 255.0, quant=QuantConfig(256, state=4096))
    x = rng.integers(0, 256, (args.batch, L_SMNIST, 1))
    run = int_model.run if args.kernel == "numpy" else lambda v: run_fast(int_model, v)
    run(x[:1])  # compile (Numba) / warm up
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run(x)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    wall, cpu_s = statistics.median(times), statistics.median(cpu)
    sps = args.batch / wall
    # CPU seconds per sample do not depend on how busy the shared machine is; with 2 cores
    # of its own the Numba kernel (prange over samples) would run at about 2 / (CPU s per
    # sample), the NumPy path (one thread) at 1 / (CPU s per sample)
    cores = 2 if args.kernel == "numba" else 1
    sps_idle = cores * args.batch / cpu_s
    macs = macs_per_sample(int_model, L_SMNIST)
    return {"model": f"{args.layers} x {args.H} (N {args.N})", "kernel": args.kernel, "threads": numba.get_num_threads(),
            "batch": args.batch, "repeats": args.repeats,
            "median_s": round(wall, 3), "samples_per_s": round(sps, 3), "macs_per_sample": macs,
            "int_macs_per_s": f"{sps * macs:.3g}", "test_set_minutes": round(TEST_SET / sps / 60, 1),
            "cpu_s_per_sample": round(cpu_s / args.batch, 3),
            "idle_machine_samples_per_s": round(sps_idle, 3),
            "idle_machine_test_set_minutes": round(TEST_SET / sps_idle / 60, 1),
            "load_average": os.getloadavg()}


def agreement(args: argparse.Namespace) -> dict:
    from qs4d_np.data.tasks import load_task

    path = Path(args.agreement)
    model = S4DModel.load(path / "best_model" if path.is_dir() else path)
    task = load_task("smnist")
    calib, _ = task.train.batch(np.arange(64))
    int_model = from_model(model, calib)
    x, labels = dataset_codes(task.test, np.arange(min(args.test, len(task.test))))
    t0 = time.perf_counter()
    result = measure_agreement(int_model, x, labels, model, traced=4)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["test_source"] = task.test.source
    result["local"] = {k: {f: v[f] for f in ("words", "differ", "max_diff", "violations")}
                       for k, v in result["local"].items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--H", type=int, default=128)
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--kernel", choices=("numba", "numpy"), default="numba",
                        help="numba: golden.fast.run_fast; numpy: IntegerModel.run (streaming, int64 NumPy)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--agreement", default=None, metavar="CKPT")
    parser.add_argument("--test", type=int, default=1000)
    args = parser.parse_args()
    print(json.dumps(agreement(args) if args.agreement else throughput(args), indent=1))


if __name__ == "__main__":
    main()
