"""QAT training-step cost against the float step (issue 3's targets).

One step = forward (training=True) + softmax cross-entropy + backward, float32,
s4d-example model (4 x 128, N = 64) on random (batch, length, 1) input.
Cases:

* float conv: the float model, convolution mode (the baseline);
* QAT conv: every target at ``--levels`` states (default 64), convolution mode
  at the reference's places (A, C, dt, K and u, mixing weight, act, coder);
* QAT recurrent: every target at ``--levels`` states in recurrent mode, so the
  state is quantized after every update (``quant_scan``) and Abar, Bbar, C, D too;
  the state's range from each batch's float states (``absmax``, the default: an
  extra float-state scan per layer);
* QAT recurrent, running ranges: the same with ``scale_mode="running"`` for the
  state and the act targets (static ranges, as a hardware export and streaming
  need); after the first batch the state range follows the quantized scan's own
  states, so no float-state scan runs (the running models see one untimed
  warm-up batch that initialises their buffers).

The cases are interleaved (one step of each per round, after one warm-up round
that also compiles Numba kernels) so a change of load on the shared machine
hits them alike; each case's median over ``--repeats`` rounds is printed with
the CPU time per step (all threads) and the 1-minute load average.
Targets: QAT conv <= 1.25x float conv; QAT recurrent <= 3x float conv.

    python benchmarks/bench_qat.py                          # batch 64, length 784, 5 rounds
    python benchmarks/bench_qat.py --batch 8 --length 128 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

TARGET_CONV_RATIO = 1.25
TARGET_RECURRENT_RATIO = 3.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=784)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--levels", type=int, default=64, help="quantization states of every target")
    args = parser.parse_args(argv)
    if min(args.batch, args.length, args.repeats) < 1 or args.levels < 3:
        parser.error(f"--batch, --length, --repeats must be >= 1 and --levels >= 3, got {args.batch}, "
                     f"{args.length}, {args.repeats}, {args.levels}")

    from qs4d_np.core.loss import SoftmaxCrossEntropy
    from qs4d_np.models.s4d_model import S4DModel
    from qs4d_np.quant import QuantConfig

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.length, 1)).astype(np.float32)
    labels = rng.integers(0, 10, args.batch)
    quant = QuantConfig(all=args.levels)
    running = QuantConfig(all=args.levels, target_options={"state": {"scale_mode": "running"},
                                                            "act": {"scale_mode": "running"}})
    cases = {
        "float conv": (S4DModel.from_preset("s4d-example", 1, 10, seed=0), "conv"),
        f"QAT conv ({args.levels} states)": (S4DModel.from_preset("s4d-example", 1, 10, seed=0, quant=quant), "conv"),
        f"QAT recurrent ({args.levels} states, quantized state)":
            (S4DModel.from_preset("s4d-example", 1, 10, seed=0, quant=quant), "recurrent"),
        f"QAT recurrent ({args.levels} states, quantized state, running ranges)":
            (S4DModel.from_preset("s4d-example", 1, 10, seed=0, quant=running), "recurrent"),
    }
    loss_fn = SoftmaxCrossEntropy()

    def step(model: S4DModel, mode: str) -> tuple[float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        loss_fn.forward(model.forward(x, training=True, mode=mode), labels)
        model.backward(loss_fn.backward())
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        for _, module in model.modules():  # drop the caches: three models' activations at once would not fit
            module._cache = None
        return wall, cpu

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    loads = []
    for round_ in range(args.repeats + 1):
        for name, (model, mode) in cases.items():
            t = step(model, mode)
            if round_:
                times[name].append(t)
        loads.append(os.getloadavg()[0])

    print(f"== QAT step vs float step: s4d-example 4 x 128, N = 64, batch {args.batch}, length {args.length}, "
          f"median of {args.repeats} interleaved rounds (1-min load {min(loads):.2f}..{max(loads):.2f}) ==")
    med = {}
    for name, ts in times.items():
        wall, cpu = np.array(ts).T
        med[name] = float(np.median(wall))
        print(f"{name:66s} {med[name]:7.3f} s/step  (CPU {np.median(cpu):7.3f} s; all: "
              f"{', '.join(f'{w:.3f}' for w in wall)})")
    base, conv, rec, rec_running = (med[n] for n in cases)
    print("\n== targets ==")
    for label, t, target in (("QAT conv", conv, TARGET_CONV_RATIO),
                             ("QAT recurrent (absmax ranges)", rec, TARGET_RECURRENT_RATIO),
                             ("QAT recurrent (running ranges)", rec_running, TARGET_RECURRENT_RATIO)):
        verdict = "met" if t / base <= target else "MISSED"
        print(f"{label + ' / float conv':44s} = {t / base:.2f} <= {target}: {verdict}")


if __name__ == "__main__":
    main()
