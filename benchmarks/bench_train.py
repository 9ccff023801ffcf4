"""Training throughput (samples/s) of full training steps: float and QAT, conv and recurrent.

One step = forward (training=True) + softmax cross-entropy + backward + AdamW
update, on random sMNIST-shaped input (batch, 784, 1). For each case the
median over ``--repeats`` timed steps (after one warm-up step, which also
compiles Numba kernels) is printed as seconds per step and samples/s, with
the 1-minute load average (the machine may be shared).

Cases: the sMNIST demo model (qs4d preset, 4 x 64, N = 64) and the
s4d-example model (4 x 128, N = 64), each float (conv), QAT with every
target at 2**bits states, one scale per channel (conv), and QAT in recurrent mode.

    python benchmarks/bench_train.py                         # batch 64, length 784, 5 repeats
    python benchmarks/bench_train.py --batch 16 --length 128 --repeats 3 --bits 6
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np

from qs4d_np.core.loss import SoftmaxCrossEntropy
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.train.optim import AdamW

STATE_CLIP = 50.0
# label -> (preset, overrides)
MODELS = {"demo (qs4d 4x64)": ("qs4d", dict(d_model=64, n_layers=4, d_state=64)),
          "s4d-example 4x128": ("s4d-example", dict())}


def step_seconds(model: S4DModel, x: np.ndarray, y: np.ndarray, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` training steps after one warm-up step."""
    optimizer = AdamW(model.params, model.param_groups(), lr=1e-3, weight_decay=0.01)
    loss = SoftmaxCrossEntropy()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss.forward(model.forward(x, training=True), y)
        model.backward(loss.backward())
        optimizer.step(model.grads)
        if i:
            times.append(time.perf_counter() - start)
    return times


def cases(bits: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, preset, S4DModel keyword arguments) per case; QAT quantizes every target per channel."""
    from qs4d_np.quant import QuantConfig
    quant = QuantConfig(2 ** bits, grid="narrow", per_channel=True)
    out = []
    for name, (preset, arch) in MODELS.items():
        out.append((f"{name} float conv", preset, dict(arch, mode="conv")))
        out.append((f"{name} QAT {bits}b conv", preset, dict(arch, mode="conv", quant=quant)))
        # the state clipped at |x| <= 50 as in Zhao et al.'s recurrent QAT (SPEC section 3)
        out.append((f"{name} QAT {bits}b recurrent", preset,
                    dict(arch, mode="recurrent", quant=quant, state_clip=STATE_CLIP)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=784)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bits", type=int, default=4, help="QAT width (2**bits states, every target)")
    parser.add_argument("--only", default=None, help="run the cases whose label contains this text")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, args.length, 1), dtype=np.float32)
    y = rng.integers(0, 10, size=args.batch)
    print(f"batch {args.batch}, length {args.length}, median of {args.repeats} steps after 1 warm-up")
    for label, preset, kwargs in cases(args.bits):
        if args.only is not None and args.only not in label:
            continue
        model = S4DModel.from_preset(preset, 1, 10, seed=0, **kwargs)
        try:
            median = statistics.median(step_seconds(model, x, y, args.repeats))
        except ValueError as exc:  # e.g. a non-finite gradient: reported, the other cases still run
            print(json.dumps({"case": label, "failed": str(exc)}), flush=True)
            continue
        print(json.dumps({"case": label, "s_per_step": round(median, 3),
                          "samples_per_s": round(args.batch / median, 1),
                          "load_1min": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
