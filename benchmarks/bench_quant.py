"""Timings of the quantization kernels (prints numbers; the tests never time).

Fake quantization of one activation tensor of the QS4D reference model
(batch 64 x L 784 x H 128, float32) against one plain elementwise pass
(x * 1) and the fused GELU kernel, then the quantized-state recurrent scan
(forward and BPTT backward) with and without the state quantizer.

    .venv/bin/python benchmarks/bench_quant.py [--repeats 9] [--scan-batch 16]

Every number is the median (and the min) wall time of ``--repeats`` runs after
one warm-up run; the load average is printed too, since the machine is shared.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from qs4d_np.kernels.elementwise import gelu_forward
from qs4d_np.quant import QuantSpec, Quantizer, StateQuant, fake_quant, quant_scan, quant_scan_backward


def timing(fn, repeats: int) -> str:
    """'median (min)' wall ms: the median is the number to report, the min shows the
    cost on idle cores (parallel kernels suffer most when other jobs hold the cores)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return f"{1e3 * float(np.median(times)):8.1f} ({1e3 * float(np.min(times)):6.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--scan-batch", type=int, default=16)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 784, 128)).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    flat, out, cdf = x.reshape(-1), np.empty(x.size, np.float32), np.empty(x.size, np.float32)
    r = args.repeats
    print(f"load average before: {os.getloadavg()}")
    print(f"activation {x.shape} float32, median (min) of {r} runs, ms")
    rows = {
        "x * 1 (one NumPy pass)": lambda: x * np.float32(1.0),
        "GELU kernel (one fused pass)": lambda: gelu_forward(flat, out, cdf),
        "fake_quant 64 levels, per-tensor absmax": lambda: fake_quant(x, 64),
        "fake_quant 64 levels, fixed range": lambda: fake_quant(x, 64, scale_mode="fixed", fixed_range=4.0),
        "fake_quant 64 levels, per-channel axis=0": lambda: fake_quant(x, 64, axis=0),
        "fake_quant 64 levels, per-channel axis=-1": lambda: fake_quant(x, 64, axis=-1),
    }
    for name, fn in rows.items():
        print(f"  {name:45s} {timing(fn, r)}")
    for ste in ("identity", "clipped"):
        q = Quantizer(64, ste=ste)
        q.forward(x, training=True)
        print(f"  {'Quantizer backward, ste=' + ste:45s} {timing(lambda: q.backward(g), r)}")
    q = Quantizer(64, scale_mode="learned", init_range=3.0)
    q.forward(x, training=True)
    print(f"  {'Quantizer backward, learned step (LSQ)':45s} {timing(lambda: q.backward(g), r)}")

    B, L, H, M = args.scan_batch, 784, 128, 32
    u = rng.normal(size=(B, L, H)).astype(np.float32)
    Abar = rng.uniform(0.8, 0.99, (H, M)) * np.exp(1j * rng.uniform(-1, 1, (H, M)))
    Bbar = 0.1 * (rng.normal(size=(H, M)) + 1j * rng.normal(size=(H, M)))
    C = rng.normal(size=(H, M)) + 1j * rng.normal(size=(H, M))
    D = rng.normal(size=H)
    print(f"quantized-state scan, u ({B}, {L}, {H}) float32, N/2 = {M}, median (min) of {r} runs, ms")
    for label, state in (("state float, clip 50", StateQuant(None)),
                         ("state 2**16 levels, inv 2**10, clip 50", StateQuant(QuantSpec(2**16), 2.0**10))):
        y, cache = quant_scan(u, Abar, Bbar, C, D, state, 50.0)
        fwd = timing(lambda: quant_scan(u, Abar, Bbar, C, D, state, 50.0), r)
        bwd = timing(lambda: quant_scan_backward(y, cache), r)
        print(f"  {label:45s} forward {fwd}   backward {bwd}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
