"""Per-step latency of streaming a whole S4DModel (one input sample per time step).

Model: the s4d-example preset (4 x 128, N = 64, GLU mixing, LayerNorm), d_input 1,
10 classes, float32; float and QAT at ``--bits`` (default 8) on every target with
running state / act ranges calibrated in recurrent mode. Paths:

* ``model.step`` (per call): ``S4DModel.step(x_t, state)``, which derives every
  layer's (quantized) parameters, state quantizer and act scales anew on each call;
* ``stream.step, per-op``: ``model.stream(fused=False)`` built once, then each step runs
  the frozen ops one after another (NumPy, BLAS, one small kernel each);
* ``stream.step, fused``: ``model.stream()``, one fused Numba call per step
  (``kernels.stream``) plus the decoder's BLAS product;
* ``stream.run, fused``: ``stream.run(x)`` over ``--steps`` steps in one call, per step;
* ``stream.run, T = --run-length``: one whole sequence (default 784, sMNIST's) in one call,
  per step: more steps than a pipeline chunk, so the layers run pipelined over Numba's
  threads (``kernels.stream.stream_steps_pipelined``), and the same on one thread
  (``numba.set_num_threads(1)``: the serial kernel) for comparison;
* ``torch step loop``: the same architecture in ``torch.nn`` with the same (quantized)
  weights and scales copied in, stepped one sample at a time under ``torch.no_grad()`` on
  ``torch.set_num_threads(1)`` (the fused step runs on one thread too); skipped with a
  line when torch is not importable;
* ``stream() build`` and ``forward / L`` (one whole-sequence recurrent forward of
  ``--length`` steps divided by the length), for scale.

The cases are interleaved per round so a change of load on the shared machine hits
them alike; each prints the median over ``--repeats`` rounds of the mean step time
within a round (``--steps`` steps), and the 1-minute load average. Each timed stretch follows
``--warmup`` untimed steps of the same path: the other paths of a round evict the model's ~1.2 MB
of weights and state from the core's 2 MB L2, and a stream that steps continuously (the use
this measures) keeps them there; ``--warmup 0`` times the first steps after the eviction.

    python benchmarks/bench_stream.py                 # batch 1 and 16, 7 rounds
    python benchmarks/bench_stream.py --batch 1 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import numba
import numpy as np


def torch_peer(stream: Any) -> Callable | None:
    """A ``torch.nn`` twin of the frozen stream (the s4d-example structure: GELU, GLU mixing,
    LayerNorm postnorm, residual, mean pooling; quantized state and act where the stream has
    them, ties to even), its weights copied from the stream's frozen pieces. Returns
    ``step(x_t, state) -> (logits, state)`` on NumPy x_t (batch, d_input) with its own state
    (None before the first step), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy  # noqa: E731

    def linear(params: dict) -> torch.nn.Linear:
        W = params["weight"]
        lin = torch.nn.Linear(*W.shape)
        lin.weight.data, lin.bias.data = t(W.T), t(params["bias"])
        return lin

    class Layer(torch.nn.Module):
        def __init__(self, block: Any) -> None:
            super().__init__()
            core, self.act = block.ssm.core, block.ssm.act
            # (M, 1, H): mode-major like the stream's state (M, batch, H)
            self.planes = [t(part.T[:, None]) for z in (core.Abar, core.Bbar, core.C) for part in (z.real, z.imag)]
            self.D = t(core.D)
            self.clip = None if core.clip is None else float(core.clip)
            self.state_q = None if core.state is None else [(t(q.inv), float(q.qmin), float(q.qmax))
                                                            for q in core.state]
            self.mixing = linear(block.ssm.post_ops[-1].linear.params)
            norm = block.norm
            self.norm = torch.nn.LayerNorm(norm.d, eps=norm.eps)
            self.norm.weight.data, self.norm.bias.data = t(norm.params["weight"]), t(norm.params["bias"])

        def forward(self, h: torch.Tensor, xr: torch.Tensor, xi: torch.Tensor) -> tuple:
            ar, ai, br, bi, cr, ci = self.planes
            vr = (ar * xr - ai * xi) + br * h
            vi = (ar * xi + ai * xr) + bi * h
            if self.clip is not None:
                vr, vi = vr.clamp(-self.clip, self.clip), vi.clamp(-self.clip, self.clip)
            if self.state_q is not None:
                (inv_r, lo, hi), (inv_i, _, _) = self.state_q
                vr = torch.round(vr * inv_r).clamp(lo, hi) / inv_r
                vi = torch.round(vi * inv_i).clamp(lo, hi) / inv_i
            y = 2 * (cr * vr - ci * vi).sum(0) + self.D * h
            y = torch.nn.functional.glu(self.mixing(torch.nn.functional.gelu(y)), dim=-1)
            if self.act is not None:
                inv, zp = t(self.act.inv), t(self.act.zp)
                y = ((torch.round(y * inv) + zp).clamp(float(self.act.qmin), float(self.act.qmax)) - zp) / inv
            return self.norm(y + h), vr, vi

    encoder, decoder = linear(stream.encoder.params), linear(stream.decoder.params)
    layers = [Layer(b) for b in stream.blocks]
    M, H = stream.d_state // 2, stream.d_model

    @torch.no_grad()
    def step(x_t: np.ndarray, state: Any) -> tuple:
        if state is None:
            zeros = torch.zeros(M, x_t.shape[0], H)
            state = ([(zeros, zeros)] * len(layers), torch.zeros(x_t.shape[0], H, dtype=torch.float64), 0)
        planes, pool_sum, steps = state
        h = encoder(torch.from_numpy(x_t))
        new = []
        for layer, (xr, xi) in zip(layers, planes):
            h, xr, xi = layer(h, xr, xi)
            new.append((xr, xi))
        pool_sum = pool_sum + h
        return decoder((pool_sum / (steps + 1)).float()), (new, pool_sum, steps + 1)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=20, help="steps timed per round and path")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each timed stretch")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--length", type=int, default=100, help="sequence length of the forward for scale")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--run-length", type=int, default=784, help="steps of the whole-sequence stream.run")
    args = parser.parse_args(argv)
    if min(*args.batch, args.steps, args.repeats, args.length, args.run_length) < 1 or args.warmup < 0 or not 2 <= args.bits <= 16:
        parser.error(f"--batch, --steps, --repeats, --length, --run-length must be >= 1, --warmup >= 0 and 2 <= --bits "
                     f"<= 16, got {args.batch}, {args.steps}, {args.repeats}, {args.length}, {args.warmup}, {args.bits}")

    from qs4d_np.models.s4d_model import S4DModel
    from qs4d_np.quant import QuantConfig
    from qs4d_np.train.ptq import calibrate

    rng = np.random.default_rng(0)
    running = {"act": {"scale_mode": "running"}, "state": {"scale_mode": "running"}}
    qat = S4DModel.from_preset("s4d-example", 1, 10, seed=0,
                               quant=QuantConfig(2 ** args.bits, target_options=running))
    calibrate(qat, [rng.standard_normal((8, args.length, 1)).astype(np.float32)], mode="recurrent")
    models = {"float": S4DModel.from_preset("s4d-example", 1, 10, seed=0), f"QAT {args.bits} bits": qat}
    peers = {m: torch_peer(model.stream()) for m, model in models.items()}
    if any(p is None for p in peers.values()):
        print("torch is not importable: the torch step loop is skipped (pip install torch to compare)\n")

    threads = numba.get_num_threads()
    for batch in args.batch:
        x = rng.standard_normal((batch, args.length, 1)).astype(np.float32)
        x_t = x[:, 0]
        chunk = np.ascontiguousarray(x[:, :args.steps])
        sequence = rng.standard_normal((batch, args.run_length, 1)).astype(np.float32)

        def stepping(step: Callable, state: Any) -> float:
            """Mean time of ``--steps`` calls of step(x_t, state) -> (logits, state), after
            ``--warmup`` untimed ones."""
            for _ in range(args.warmup):
                _, state = step(x_t, state)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                _, state = step(x_t, state)
            return (time.perf_counter() - t0) / args.steps

        def running_chunk(stream: Any) -> float:
            if args.warmup:
                stream.run(chunk[:, :args.warmup])
            t0 = time.perf_counter()
            stream.run(chunk)
            return (time.perf_counter() - t0) / chunk.shape[1]

        def running_sequence(stream: Any, threads: int) -> float:
            threads_before = numba.get_num_threads()
            numba.set_num_threads(threads)
            try:
                if args.warmup:
                    stream.run(sequence[:, :args.warmup])
                t0 = time.perf_counter()
                stream.run(sequence)
                return (time.perf_counter() - t0) / sequence.shape[1]
            finally:
                numba.set_num_threads(threads_before)

        def build(model: S4DModel) -> float:
            t0 = time.perf_counter()
            model.stream()
            return time.perf_counter() - t0

        def forward(model: S4DModel) -> float:
            t0 = time.perf_counter()
            model.forward(x, mode="recurrent")
            return (time.perf_counter() - t0) / args.length

        streams = {m: (model.stream(), model.stream(fused=False)) for m, model in models.items()}
        paths: dict[str, Callable[[str, S4DModel], float]] = {
            "model.step (per call)": lambda m, model: stepping(model.step, model.initial_state(batch)),
            "stream.step, per-op": lambda m, model: stepping(streams[m][1].step, model.initial_state(batch)),
            "stream.step, fused": lambda m, model: stepping(streams[m][0].step, model.initial_state(batch)),
            "stream.run, fused": lambda m, model: running_chunk(streams[m][0]),
            f"stream.run, T = {args.run_length}, {threads} threads": lambda m, model: running_sequence(streams[m][0], threads),
            f"stream.run, T = {args.run_length}, 1 thread": lambda m, model: running_sequence(streams[m][0], 1),
            "stream() build": lambda m, model: build(model),
            f"forward / L (L = {args.length})": lambda m, model: forward(model),
        }
        if all(p is not None for p in peers.values()):
            paths["torch step loop (no_grad)"] = lambda m, model: stepping(peers[m], None)
            for m, model in models.items():  # the peer computes what the stream computes
                want, _ = streams[m][0].run(x[:, :5])
                state, got = None, []
                for t in range(5):
                    logits, state = peers[m](np.ascontiguousarray(x[:, t]), state)
                    got.append(logits.numpy())
                print(f"torch peer vs stream ({m}, batch {batch}): max |logits diff| over 5 steps "
                      f"{np.abs(np.stack(got, axis=1) - want).max():.1e}")
        times: dict[tuple[str, str], list[float]] = {(m, p): [] for m in models for p in paths}
        loads = []
        for round_ in range(args.repeats + 1):  # round 0 warms up (Numba compilation, BLAS pool)
            for m, model in models.items():
                for p, fn in paths.items():
                    t = fn(m, model)
                    if round_:
                        times[m, p].append(t)
            loads.append(os.getloadavg()[0])
        print(f"== streaming s4d-example 4 x 128, N = 64, batch {batch}, float32: median of {args.repeats} "
              f"interleaved rounds (1-min load {min(loads):.2f}..{max(loads):.2f}) ==")
        for (m, p), ts in times.items():
            per = "" if "build" in p else f" per step = {1e6 * np.median(ts) / batch:8.1f} us per sample"
            print(f"{m:12s} {p:34s} {1e3 * np.median(ts):9.3f} ms{per}")
        if "torch step loop (no_grad)" in paths:
            for m in models:
                ratio = np.median(times[m, "torch step loop (no_grad)"]) / np.median(times[m, "stream.step, fused"])
                print(f"{m:12s} torch step loop / fused stream.step: {ratio:.1f}x")
        print()


if __name__ == "__main__":
    main()
