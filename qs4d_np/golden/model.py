"""The integer QS4D model: encoder, S4D layers, pooling and decoder (docs/integer_spec.md, section 5).

Streaming order, per time step t and layer i (every value an int64 integer):

    u      = enc(x_t)                                   (layer 0; else the previous layer's out)
    x, y   = SSMCore.step(x, u)                         (section 4)
    za, zb = mix_a(y), mix_b(y)                         (Linear H -> 2H, the two GLU halves)
    sig    = sig_lut[zb - qmin_gate]                    (sigmoid table, 0..2**F_sig)
    act    = glu(za * sig)                              (one-term requantization, act grid)
    out    = post(act [, u])                            (folded BatchNorm and/or residual, or act itself)

then S = sum_t out_t, the mean avg = pool(S) (one requantization folds the
1/L) and logits = dec(avg); the class is the first index of the largest logit. Every requantization is
``fixedpoint.requantize`` (one RNE rounding, then saturation); constructors
prove every accumulator fits int64 for all inputs on the grids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from qs4d_np.core.checks import check_array, check_int
from qs4d_np.golden.fixedpoint import IntFormat, check_headroom, requantize
from qs4d_np.golden.layer import SSMCore

# Traced tensors of a layer, in streaming order; the core's own come first.
LAYER_TENSORS = ("u", "x_re", "x_im", "y", "za", "zb", "sig", "act", "out")
ROUNDED = ("x_re", "x_im", "y", "za", "zb", "act", "out")  # tensors with saturation flags


def _int_array(name: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    value = check_array(name, value, shape=shape)
    if value.dtype.kind not in ("i", "u"):
        raise TypeError(f"{name} must be an integer numpy array, got dtype {value.dtype}")
    return value.astype(np.int64)


@dataclass
class Requant:
    """Per output channel: out = sat(RNE((sum_k M[k] * T_k + offset) / 2**R)) on ``fmt``.

    ``M``: one (C,) array of non-negative multipliers per term; ``R``: (C,)
    shifts; ``offset``: (C,) int64 at the multiplied sum's scale (a folded
    BatchNorm shift) or None; ``sign``: (C,) of +-1 applied to every term (a
    negative BatchNorm gain), or None. ``bounds`` are the worst |T_k|, used
    to prove int64 headroom.
    """

    name: str
    M: Sequence[np.ndarray]
    R: np.ndarray
    fmt: IntFormat
    bounds: Sequence[int]
    offset: np.ndarray | None = None
    sign: np.ndarray | None = None

    def __post_init__(self) -> None:
        C = check_array(f"{self.name}.R", self.R, ndim=1, min_size=1).shape[0]
        self.R = _int_array(f"{self.name}.R", self.R, (C,))
        self.M = [_int_array(f"{self.name}.M[{k}]", m, (C,)) for k, m in enumerate(self.M)]
        if len(self.bounds) != len(self.M):
            raise ValueError(f"{self.name}: {len(self.M)} multipliers but {len(self.bounds)} term bounds")
        mults, bounds = list(self.M), list(self.bounds)
        if self.offset is not None:
            self.offset = _int_array(f"{self.name}.offset", self.offset, (C,))
            mults.append(np.abs(self.offset))
            bounds.append(1)
        if self.sign is not None:
            self.sign = _int_array(f"{self.name}.sign", self.sign, (C,))
            if not np.all(np.abs(self.sign) == 1):
                raise ValueError(f"{self.name}.sign must be +1 or -1 everywhere")
        check_headroom(self.name, bounds, mults, self.R)

    def __call__(self, terms: Sequence[np.ndarray], *, return_acc: bool = False) -> tuple[np.ndarray, ...]:
        """(out, flags), and with ``return_acc`` the exact sum before rounding (sign and offset applied)."""
        if self.sign is not None:
            terms = [self.sign * t for t in terms]
        return requantize(terms, self.M, self.R, self.fmt, self.offset, return_acc=return_acc)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"{self.name}_m{k}": m for k, m in enumerate(self.M)}
        out[f"{self.name}_r"] = self.R
        if self.offset is not None:
            out[f"{self.name}_offset"] = self.offset
        if self.sign is not None:
            out[f"{self.name}_sign"] = self.sign
        return out


@dataclass
class IntLinear:
    """acc = a @ W + b (exact), then one-term ``Requant`` per output: a (..., d_in) -> (..., d_out).

    W (d_in, d_out) on ``w_fmt``; b (d_out,) an integer at the product scale
    s_W * s_a, so it adds to the accumulator exactly.
    """

    name: str
    W: np.ndarray
    b: np.ndarray
    w_fmt: IntFormat
    in_fmt: IntFormat
    M: np.ndarray
    R: np.ndarray
    out_fmt: IntFormat
    requant: Requant = field(init=False)

    def __post_init__(self) -> None:
        self.W = self.w_fmt.check(f"{self.name}.W", check_array(f"{self.name}.W", self.W, ndim=2))
        d_in, d_out = self.W.shape
        self.b = _int_array(f"{self.name}.b", self.b, (d_out,))
        acc_bound = d_in * self.w_fmt.maxabs * self.in_fmt.maxabs + int(np.abs(self.b).max())
        self.requant = Requant(self.name, [self.M], self.R, self.out_fmt, [acc_bound])

    def accumulate(self, a: np.ndarray) -> np.ndarray:
        return a @ self.W + self.b

    def __call__(self, a: np.ndarray, *, return_acc: bool = False) -> tuple[np.ndarray, ...]:
        return self.requant([self.accumulate(a)], return_acc=return_acc)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"{self.name}_W": self.W, f"{self.name}_b": self.b, **self.requant.arrays()}


@dataclass(frozen=True)
class ModeMap:
    """Which original SSM modes a compacted core keeps (modes with C = 0 dropped at export).

    ``M``: the layer's original mode count; ``kept[h]``: the original indices,
    increasing, of the modes channel h keeps, in the core's mode order; core
    modes ``len(kept[h])`` .. N2-1 of channel h are inert padding (Abar, Bbar,
    C codes and state multipliers 0).
    """

    M: int
    kept: tuple[tuple[int, ...], ...]

    def check(self, core: SSMCore) -> None:
        """Fail unless the map fits ``core`` (H channels, N2 <= M) and every padding mode is inert."""
        if len(self.kept) != core.H:
            raise ValueError(f"mode map has {len(self.kept)} channels, the core {core.H}")
        if core.N2 > self.M:
            raise ValueError(f"the core has N2={core.N2} modes, more than the original M={self.M}")
        for h, idx in enumerate(self.kept):
            if len(idx) > core.N2 or any(a >= b for a, b in zip(idx, idx[1:])) or \
                    (idx and (idx[0] < 0 or idx[-1] >= self.M)):
                raise ValueError(f"channel {h}: kept modes {list(idx)} must be increasing indices in "
                                 f"[0, {self.M}), at most N2={core.N2} of them")
            pad = slice(len(idx), None)
            if any(np.any(a[h, pad] != 0) for a in core.arrays().values() if a.ndim == 2):
                raise ValueError(f"channel {h}: padding modes {len(idx)}..{core.N2 - 1} must be all zero words")


@dataclass
class IntLayer:
    """One S4D block: SSM core, mixing halves, sigmoid table, GLU requantization, optional post op.

    ``sig_lut`` has one entry per code of ``mix_b``'s grid (index zb - qmin),
    values in [0, 2**sig_bits]. ``post`` is None when the block has neither
    norm nor residual (out = act); else a ``Requant`` over [act] or [act, u].
    ``modes`` maps the core's modes to the original ones when the export
    dropped modes with C = 0; None when the core keeps every mode in order.
    """

    core: SSMCore
    mix_a: IntLinear
    mix_b: IntLinear
    sig_lut: np.ndarray
    sig_bits: int
    glu: Requant
    post: Requant | None = None
    residual: bool = False
    modes: ModeMap | None = None

    def __post_init__(self) -> None:
        gate = self.mix_b.requant.fmt
        self.sig_bits = check_int("sig_bits", self.sig_bits, min_value=1, max_value=30)
        self.sig_lut = _int_array("sig_lut", self.sig_lut, (gate.qmax - gate.qmin + 1,))
        if self.sig_lut.min() < 0 or self.sig_lut.max() > 1 << self.sig_bits:
            raise ValueError(f"sig_lut values must lie in [0, 2**{self.sig_bits}]")
        if self.residual and (self.post is None or len(self.post.M) != 2):
            raise ValueError("a residual block needs a two-term post requantization (act, u)")
        if self.modes is not None:
            self.modes.check(self.core)

    @property
    def out_fmt(self) -> IntFormat:
        return self.glu.fmt if self.post is None else self.post.fmt

    def step(self, x_re: np.ndarray, x_im: np.ndarray, u: np.ndarray, *, return_acc: bool = False
             ) -> dict[str, np.ndarray]:
        """One time step for a batch: state (B, H, N2), u (B, H) -> every tensor and 'sat_*' flag.

        With ``return_acc`` also ``acc_<tensor>`` for every rounded tensor: the exact int64 sum
        its one RNE shift rounds (docs/integer_spec.md 2.3), to see which term went wrong.
        """
        t = {"u": u}
        core = self.core.step(x_re, x_im, u, return_acc=True)
        t["x_re"], t["x_im"], t["y"], t["sat_x_re"], t["sat_x_im"], t["sat_y"] = core[:6]
        acc = dict(zip(("x_re", "x_im", "y"), core[6:]))
        t["za"], t["sat_za"], acc["za"] = self.mix_a(t["y"], return_acc=True)
        t["zb"], t["sat_zb"], acc["zb"] = self.mix_b(t["y"], return_acc=True)
        t["sig"] = self.sig_lut[t["zb"] - self.mix_b.requant.fmt.qmin]
        t["act"], t["sat_act"], acc["act"] = self.glu([t["za"] * t["sig"]], return_acc=True)
        if self.post is None:
            t["out"], t["sat_out"] = t["act"], np.zeros_like(t["act"])
        else:
            t["out"], t["sat_out"], acc["out"] = self.post([t["act"], u] if self.residual else [t["act"]],
                                                           return_acc=True)
        if return_acc:
            t.update({"acc_" + k: v for k, v in acc.items()})
        return t

    def shifts(self) -> dict[str, tuple[np.ndarray, IntFormat]]:
        """Per rounded tensor of the layer: its shift words (broadcast over its trace) and output format."""
        c = self.core
        out = {"x_re": (c.r_x, c.formats.x), "x_im": (c.r_x, c.formats.x), "y": (c.r_y, c.formats.y),
               "za": (self.mix_a.requant.R, self.mix_a.requant.fmt),
               "zb": (self.mix_b.requant.R, self.mix_b.requant.fmt), "act": (self.glu.R, self.glu.fmt)}
        if self.post is not None:
            out["out"] = (self.post.R, self.post.fmt)
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        out = {**self.core.arrays(), **self.mix_a.arrays(), **self.mix_b.arrays(), "sig_lut": self.sig_lut,
               **self.glu.arrays()}
        if self.post is not None:
            out.update(self.post.arrays())
        return out


@dataclass
class ModelTrace:
    """A run's result: logits (B, classes), predictions (B,), pooled sums and means (B, H), saturation counts.

    With ``trace=True``: ``layers[i][name]`` for every name of
    ``LAYER_TENSORS`` shaped (B, L, H) ((B, L, H, N2) for the state, (B, L, 2H)
    never: za and zb are (B, L, H)), and the matching ``sat_*`` flags.
    """

    logits: np.ndarray
    predictions: np.ndarray
    pooled: np.ndarray
    avg: np.ndarray  # the pooled mean, requantized
    saturation: list[dict[str, int]]
    layers: list[dict[str, np.ndarray]] | None = None
    acc: dict[str, np.ndarray] | None = None  # with trace_acc: the sums before rounding of avg and logits


class IntegerModel:
    """The whole integer model; ``run(x)`` takes int64 inputs (B, L, d_in) on ``in_fmt``.

    ``length`` is the sequence length the pooling's 1/L was folded for; ``pool``
    requantizes the sum over time (B, H) onto the decoder's input grid.
    ``steps`` (tensor name -> real step per integer) and ``eps`` (rounded
    tensor -> local agreement bound, docs/integer_spec.md section 6) are export
    metadata for the manifest and the float twin; the integer path never reads them.
    """

    def __init__(self, in_fmt: IntFormat, encoder: IntLinear, layers: Sequence[IntLayer],
                 pool: Requant, decoder: IntLinear, length: int, steps: dict | None = None,
                 eps: dict | None = None) -> None:
        self.in_fmt, self.encoder, self.layers, self.decoder = in_fmt, encoder, list(layers), decoder
        self.pool = pool
        self.length = check_int("length", length, min_value=1)
        self.steps, self.eps = steps or {}, eps or {}
        if not self.layers:
            raise ValueError("an IntegerModel needs at least one layer")
        chain = [("encoder", encoder.requant.fmt)] + [(f"layer {i}", l.out_fmt) for i, l in enumerate(self.layers)]
        for (src, fmt), (i, layer) in zip(chain, enumerate(self.layers)):
            if fmt != layer.core.formats.u:
                raise ValueError(f"{src} writes {fmt} but layer {i} reads u on {layer.core.formats.u}")
        if pool.bounds[0] < self.length * self.layers[-1].out_fmt.maxabs:
            raise ValueError(f"pool's term bound {pool.bounds[0]} cannot hold the sum of {self.length} outputs")
        if pool.fmt != decoder.in_fmt:
            raise ValueError(f"pool writes {pool.fmt} but the decoder reads {decoder.in_fmt}")

    @property
    def d_input(self) -> int:
        return self.encoder.W.shape[0]

    def run(self, x: np.ndarray, *, trace: bool = False, trace_acc: bool = False) -> ModelTrace:
        """Stream int ``x`` (B, L, d_in) through every layer, step by step.

        ``trace_acc`` (implies ``trace``) also keeps every rounded tensor's accumulator before
        rounding: ``layers[i]["acc_<tensor>"]`` (the encoder's as layer 0's ``acc_u``) and
        ``acc["avg"]``, ``acc["logits"]``.
        """
        trace = trace or trace_acc
        check_array("x", x, ndim=3, min_size=1)
        if x.shape[1:] != (self.length, self.d_input):
            raise ValueError(f"x must have shape (batch, {self.length}, {self.d_input}), got {x.shape}")
        x = self.in_fmt.check("x", x)
        B, L = x.shape[:2]
        states = [(np.zeros((B, l.core.H, l.core.N2), dtype=np.int64),) * 2 for l in self.layers]
        sat = [{k: 0 for k in ROUNDED} for _ in self.layers]
        enc_sat = 0
        traces = None
        if trace:
            traces = [{} for _ in self.layers]
        pooled = np.zeros((B, self.layers[-1].core.H), dtype=np.int64)
        for t in range(L):
            u, flags, enc_acc = self.encoder(x[:, t], return_acc=True)
            enc_sat += int(flags.sum())
            for i, layer in enumerate(self.layers):
                step = layer.step(*states[i], u, return_acc=trace_acc)
                if trace_acc and i == 0:
                    step["acc_u"] = enc_acc
                states[i] = (step["x_re"], step["x_im"])
                for k in ROUNDED:
                    sat[i][k] += int(step["sat_" + k].sum())
                if trace:
                    for k, v in step.items():
                        if k not in traces[i]:
                            traces[i][k] = np.zeros((B, L) + v.shape[1:], dtype=np.int64)
                        traces[i][k][:, t] = v
                u = step["out"]
            pooled += u
        avg, pool_flags, pool_acc = self.pool([pooled], return_acc=True)
        logits, dec_flags, dec_acc = self.decoder(avg, return_acc=True)
        sat[0]["encoder"] = enc_sat
        sat[-1]["avg"], sat[-1]["logits"] = int(pool_flags.sum()), int(dec_flags.sum())
        acc = {"avg": pool_acc, "logits": dec_acc} if trace_acc else None
        return ModelTrace(logits, np.argmax(logits, axis=1), pooled, avg, sat, traces, acc)

    def shifts(self) -> dict[str, tuple[np.ndarray, IntFormat]]:
        """Every rounded tensor (``layers.i.<t>``, the encoder's ``layers.0.u``, ``avg``, ``logits``):
        its shift words, broadcasting over its trace, and its output format."""
        out = {"layers.0.u": (self.encoder.requant.R, self.encoder.requant.fmt)}
        for i, layer in enumerate(self.layers):
            out.update({f"layers.{i}.{k}": v for k, v in layer.shifts().items()})
        out["avg"] = (self.pool.R, self.pool.fmt)
        out["logits"] = (self.decoder.requant.R, self.decoder.requant.fmt)
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Every integer parameter as ``<part>.<name>`` (part = encoder, layers.i, pool, decoder)."""
        out = {f"encoder.{k}": v for k, v in self.encoder.arrays().items()}
        for i, layer in enumerate(self.layers):
            out.update({f"layers.{i}.{k}": v for k, v in layer.arrays().items()})
        out.update({f"pool.{k}": v for k, v in self.pool.arrays().items()})
        out.update({f"decoder.{k}": v for k, v in self.decoder.arrays().items()})
        return out
