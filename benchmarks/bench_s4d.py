"""Training-step benchmark of the s4d-example model (4 x 128, N = 64) in float32.

Prints, per mode (conv, recurrent), the median over ``--repeats`` timed steps
(after one warm-up) of one training step: forward (training=True) +
softmax cross-entropy + backward, split into forward and backward; a
per-op breakdown of one further step (exclusive wall and CPU times: an op's
own time without its children's); the recurrent scan's throughput in mode-updates/s
(batch * length * d_model * d_state/2 complex updates per second of the S4D
layer's recurrent path, forward and backward); and the peak resident memory
(ru_maxrss). CPU time per step (all threads) is printed too: on a shared
machine it varies less than wall time. Each mode runs in its own subprocess so the memory peaks are
separate. Targets: conv step <= 1.5 s, recurrent step <= 3x conv, peak <= 3 GB.

The machine may be shared: the 1-minute load average is printed next to the numbers.

    python benchmarks/bench_s4d.py                     # batch 64, length 784
    python benchmarks/bench_s4d.py --batch 8 --length 128 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np

TARGET_CONV_S = 1.5
TARGET_RECURRENT_RATIO = 3.0
TARGET_PEAK_GB = 3.0


def op_label(name: str, module: Any) -> str:
    """Group modules for the breakdown: the S4D core, each op class, the block's own work."""
    kind = type(module).__name__
    if kind == "S4DCore":
        return "S4D core (kernel/FFT or scan, D skip)"
    if kind == "S4D":
        return "S4D layer (its own glue)"
    if kind == "S4DBlock":
        return "block (residual add)"
    if kind == "Dropout":
        return "Dropout (inside S4D)" if name.endswith("ssm.dropout") else "Dropout (block)"
    if name in ("encoder", "decoder"):
        return f"Linear ({name})"
    return kind


# Methods timed per module: the op interface (a parent calls a child's forward(..., checked=True)).
PHASES = {"forward": "forward", "backward": "backward"}


def instrument(model: Any) -> tuple[dict[str, np.ndarray], Callable[[], None]]:
    """Wrap every submodule's forward/backward to record exclusive times; returns (times, undo).

    times[label] = [wall seconds, CPU seconds (all threads of the process)].
    """
    times: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(2))
    stack: list[np.ndarray] = []  # children's times accumulated inside the running call

    def now() -> np.ndarray:
        return np.array([time.perf_counter(), time.process_time()])

    def wrap(label: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack.append(np.zeros(2))
            start = now()
            try:
                return fn(*args, **kwargs)
            finally:
                total = now() - start
                children = stack.pop()
                times[label] += total - children
                if stack:
                    stack[-1] += total
        return timed

    originals = []
    for name, module in model.modules():
        if module is model or not name or name == "layers":
            continue
        label = op_label(name, module)
        for method, phase in PHASES.items():
            if hasattr(module, method):
                originals.append((module, method))
                setattr(module, method, wrap(f"{label} {phase}", getattr(module, method)))

    def undo() -> None:
        for module, method in originals:
            delattr(module, method)

    return times, undo


def run_mode(mode: str, batch: int, length: int, repeats: int) -> dict[str, Any]:
    """One mode's measurements (runs inside the child process)."""
    from qs4d_np.core.loss import SoftmaxCrossEntropy
    from qs4d_np.models.s4d_model import S4DModel
    from qs4d_np.ssm.s4d import S4D

    rng = np.random.default_rng(0)
    model = S4DModel.from_preset("s4d-example", 1, 10, mode=mode, seed=0)
    loss_fn = SoftmaxCrossEntropy()
    x = rng.standard_normal((batch, length, 1)).astype(np.float32)
    labels = rng.integers(0, 10, batch)

    def step() -> tuple[float, float, float]:
        c0 = time.process_time()
        t0 = time.perf_counter()
        loss_fn.forward(model.forward(x, training=True), labels)
        t1 = time.perf_counter()
        model.backward(loss_fn.backward())
        return t1 - t0, time.perf_counter() - t1, time.process_time() - c0

    step()  # warm-up: Numba compilation / cache load, first-touch allocations
    fwd, bwd, cpu = np.array([step() for _ in range(repeats)]).T
    times, undo = instrument(model)
    step()
    undo()
    breakdown = {label: t.tolist() for label, t in sorted(times.items(), key=lambda kv: -kv[1][0])}

    H, N = 128, 64
    layer = S4D(H, N, activation=None, mixing=None, seed=0)
    u = rng.standard_normal((batch, length, H)).astype(np.float32)
    dy = rng.standard_normal((batch, length, H)).astype(np.float32)
    layer.forward(u, mode="recurrent")
    layer.backward(dy)
    scan_f, scan_b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        layer.forward(u, mode="recurrent")
        t1 = time.perf_counter()
        layer.backward(dy)
        scan_f.append(t1 - t0)
        scan_b.append(time.perf_counter() - t1)
    updates = batch * length * H * (N // 2)
    return {
        "mode": mode, "batch": batch, "length": length, "repeats": repeats,
        "step_s": float(np.median(fwd + bwd)), "forward_s": float(np.median(fwd)),
        "backward_s": float(np.median(bwd)), "steps_s": (fwd + bwd).tolist(),
        "cpu_s": float(np.median(cpu)),
        "breakdown_s": breakdown,
        "scan_forward_updates_per_s": updates / float(np.median(scan_f)),
        "scan_backward_updates_per_s": updates / float(np.median(scan_b)),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "load_1min": os.getloadavg()[0],
    }


def report(results: list[dict[str, Any]]) -> None:
    for r in results:
        print(f"\n== {r['mode']} mode: batch {r['batch']}, length {r['length']}, median of {r['repeats']} steps "
              f"(load {r['load_1min']:.2f}) ==")
        print(f"step {r['step_s']:.3f} s = forward {r['forward_s']:.3f} s + backward {r['backward_s']:.3f} s"
              f"   (all steps: {', '.join(f'{t:.3f}' for t in r['steps_s'])})")
        print(f"CPU time per step, all threads: {r['cpu_s']:.3f} s (wall >= CPU / cores on an idle machine)")
        print(f"scan (S4D recurrent path, H=128, N=64): forward {r['scan_forward_updates_per_s']:.3g}, "
              f"backward {r['scan_backward_updates_per_s']:.3g} mode-updates/s")
        print(f"peak memory (ru_maxrss): {r['peak_rss_gb']:.2f} GB")
        total, total_cpu = np.sum(list(r["breakdown_s"].values()), axis=0)
        print(f"per-op exclusive time in one instrumented step (sum {total:.3f} s wall, {total_cpu:.3f} s CPU):")
        for label, (t, cpu) in r["breakdown_s"].items():
            print(f"  {label:48s} {t * 1e3:8.1f} ms  {100 * t / total:5.1f}%   CPU {cpu * 1e3:8.1f} ms")
    by_mode = {r["mode"]: r for r in results}
    print("\n== targets ==")
    if "conv" in by_mode:
        c = by_mode["conv"]["step_s"]
        print(f"conv step {c:.3f} s <= {TARGET_CONV_S} s: {'met' if c <= TARGET_CONV_S else 'MISSED'}")
        if "recurrent" in by_mode:
            ratio = by_mode["recurrent"]["step_s"] / c
            print(f"recurrent / conv = {ratio:.2f} <= {TARGET_RECURRENT_RATIO}: "
                  f"{'met' if ratio <= TARGET_RECURRENT_RATIO else 'MISSED'}")
    for r in results:
        ok = r["peak_rss_gb"] <= TARGET_PEAK_GB
        print(f"{r['mode']} peak {r['peak_rss_gb']:.2f} GB <= {TARGET_PEAK_GB} GB: {'met' if ok else 'MISSED'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=784)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["conv", "recurrent"], choices=["conv", "recurrent"])
    parser.add_argument("--child", choices=["conv", "recurrent"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.batch, args.length, args.repeats) < 1:
        parser.error(f"--batch, --length and --repeats must be >= 1, got {args.batch}, {args.length}, {args.repeats}")
    if args.child:
        print(json.dumps(run_mode(args.child, args.batch, args.length, args.repeats)))
        return
    results = []
    for mode in args.modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--batch", str(args.batch),
               "--length", str(args.length), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    report(results)


if __name__ == "__main__":
    main()
