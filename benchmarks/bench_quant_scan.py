"""Per-kernel cost of the quantized-state recurrent scan (one S4D layer's share of a QAT step).

Times the three calls a recurrent QAT step makes per layer, through the public API
(``qs4d_np.quant.scan``): the float-state range (``state_absmax``), the quantized
forward (``quant_scan``), the same forward also observing the pre-quantization
state maxima (what a training step with a running state range runs instead of
``state_absmax`` + forward) and the backward (``quant_scan_backward``). Default shape
= one layer of bench_qat.py's s4d-example model: batch 64, length 784, H = 128
channels, M = 32 complex modes, float32, 64 state levels, ranges from the float
states (the default absmax state quantizer, some codes saturate at 0.8x the range).
Each kernel's median wall time over ``--repeats`` runs (after a compiling warm-up)
is printed with the CPU time (all threads) and the 1-minute load average.

    python benchmarks/bench_quant_scan.py
    python benchmarks/bench_quant_scan.py --batch 8 --length 128 --repeats 3
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=784)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--modes", type=int, default=32, help="complex modes M = N/2")
    parser.add_argument("--levels", type=int, default=64, help="state quantization levels")
    parser.add_argument("--ste", choices=("identity", "clipped"), default="identity")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if min(args.batch, args.length, args.channels, args.modes, args.repeats) < 1 or args.levels < 3:
        parser.error("--batch, --length, --channels, --modes, --repeats must be >= 1 and --levels >= 3")

    from qs4d_np.quant.fake import QuantSpec
    from qs4d_np.quant.scan import StateQuant, quant_scan, quant_scan_backward, state_absmax

    B, L, H, M = args.batch, args.length, args.channels, args.modes
    rng = np.random.default_rng(0)
    u = rng.standard_normal((B, L, H)).astype(np.float32)
    Abar = rng.uniform(0.6, 0.999, (H, M)) * np.exp(1j * rng.uniform(-3, 3, (H, M)))
    Bbar = 0.5 * (rng.standard_normal((H, M)) + 1j * rng.standard_normal((H, M)))
    C = rng.standard_normal((H, M)) + 1j * rng.standard_normal((H, M))
    D = rng.standard_normal(H)
    gy = rng.standard_normal((B, L, H)).astype(np.float32)
    float_state = StateQuant(None)
    state = StateQuant.calibrated(QuantSpec(args.levels), 0.8 * state_absmax(u, Abar, Bbar, float_state),
                                  "part", ste=args.ste)
    observing = dataclasses.replace(state, observer=lambda wmax: None)
    _, cache = quant_scan(u, Abar, Bbar, C, D, state)
    kernels = {
        "state_absmax (float states)": lambda: state_absmax(u, Abar, Bbar, float_state),
        "quant_scan (forward)": lambda: quant_scan(u, Abar, Bbar, C, D, state),
        "quant_scan (forward, observing)": lambda: quant_scan(u, Abar, Bbar, C, D, observing),
        "quant_scan_backward": lambda: quant_scan_backward(gy, cache),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in kernels}
    loads = []
    for round_ in range(args.repeats + 1):  # round 0 compiles
        for name, fn in kernels.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            if round_:
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
        loads.append(os.getloadavg()[0])
    print(f"== quantized scan kernels: batch {B}, length {L}, H {H}, M {M}, float32, {args.levels} state levels, "
          f"ste {args.ste}; median of {args.repeats} interleaved rounds (1-min load {min(loads):.2f}.."
          f"{max(loads):.2f}) ==")
    for name, ts in times.items():
        wall, cpu = np.array(ts).T
        print(f"{name:33s} {np.median(wall):7.3f} s  (CPU {np.median(cpu):7.3f} s; all: "
              f"{', '.join(f'{w:.3f}' for w in wall)})")


if __name__ == "__main__":
    main()
