"""The float64 fake-quant twin of the integer model (docs/integer_spec.md, section 6).

Same quantization points as ``IntegerModel`` (every word code * step), but
every requantization uses the exact real ratio and ``np.rint`` instead of an
integer multiplier and shift, and the GLU gate uses the exact sigmoid
instead of the table. It is what the export calibrates with and what the
agreement bound is stated against:

* ``free``: the twin runs on its own codes from the input on (end to end);
* ``teacher``: every op reads the integer model's trace for its inputs (the
  state step reads x_{t-1} from the trace), so each traced tensor is
  compared one op at a time: it must equal clip(rint(v)) of the twin's
  pre-rounding value v (in output LSBs), except within eps of a rounding
  boundary, and there by exactly one LSB (``check_local_bound``).

Real values are float64; ``steps`` are the model's ``IntegerModel.steps``.
"""
from __future__ import annotations

import numpy as np

from qs4d_np.golden.fixedpoint import IntFormat
from qs4d_np.golden.model import IntegerModel, IntLayer, IntLinear, ModelTrace

# float64 evaluation of a pre-rounding value v carries a relative error of a
# few ulps per operation; 1e-9 * (1 + |terms|) covers it with a wide margin
# (sums of at most ~1e4 terms, 2**-52 each) without hiding a real one-LSB miss.
FLOAT_SLACK = 1e-9


def codes(v: np.ndarray, fmt: IntFormat) -> np.ndarray:
    """clip(rint(v)) on ``fmt``'s grid, as int64 (the fake quantizer's round-then-clamp)."""
    return np.clip(np.rint(v), fmt.qmin, fmt.qmax).astype(np.int64)


def linear_v(lin: IntLinear, a: np.ndarray, s_a: np.ndarray, s_W: np.ndarray, s_out: np.ndarray) -> np.ndarray:
    """(a*s_a) @ (W*s_W) + b*s_W*s_a in output LSBs (s_W per output channel or scalar)."""
    real = (a * s_a) @ (lin.W * s_W) + lin.b * (s_W * s_a)
    return real / s_out


def sigmoid(v: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * v))  # no overflow for large |v|


class LayerTwin:
    """Real-valued ops of one ``IntLayer``: each returns v, the pre-rounding value in output LSBs."""

    def __init__(self, layer: IntLayer, steps: dict, prefix: str) -> None:
        self.layer = layer
        s = {k[len(prefix):]: np.asarray(v, dtype=np.float64) for k, v in steps.items() if k.startswith(prefix)}
        self.s = s
        c = layer.core
        self.Abar = s["Abar_re"] * c.Abar_re + 1j * s["Abar_im"] * c.Abar_im
        self.Bbar = s["Bbar_re"] * c.Bbar_re + 1j * s["Bbar_im"] * c.Bbar_im
        self.C = s["C_re"][:, None] * c.C_re + 1j * s["C_im"][:, None] * c.C_im
        self.D = s["D"] * c.D

    def state(self, x_re: np.ndarray, x_im: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x_{t-1} codes (B, H, N2), u_t codes (B, H) -> (v_re, v_im)."""
        s = self.s
        x = s["x_re"][:, None] * x_re + 1j * s["x_im"][:, None] * x_im
        v = self.Abar * x + self.Bbar * (s["u"] * u)[:, :, None]
        return v.real / s["x_re"][:, None], v.imag / s["x_im"][:, None]

    def readout(self, x_re: np.ndarray, x_im: np.ndarray, u: np.ndarray) -> np.ndarray:
        s = self.s
        x = s["x_re"][:, None] * x_re + 1j * s["x_im"][:, None] * x_im
        return (2.0 * (self.C * x).real.sum(axis=-1) + self.D * (s["u"] * u)) / s["y"]

    def mix(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        l, s = self.layer, self.s
        return (linear_v(l.mix_a, y, s["y"], s["W_a"], s["za"]),
                linear_v(l.mix_b, y, s["y"], s["W_b"], s["zb"]))

    def glu(self, za: np.ndarray, zb: np.ndarray) -> np.ndarray:
        s = self.s
        return za * s["za"] * sigmoid(zb * s["zb"]) / s["act"]

    def post(self, act: np.ndarray, u: np.ndarray) -> np.ndarray:
        s = self.s
        real = act * s["act"] + (u * s["u"] if self.layer.residual else 0.0)
        return (s["bn_k"] * real + s["bn_c"]) / s["out"]


def twin_layers(model: IntegerModel) -> list[LayerTwin]:
    return [LayerTwin(layer, model.steps, f"layers.{i}.") for i, layer in enumerate(model.layers)]


def encoder_v(model: IntegerModel, x: np.ndarray) -> np.ndarray:
    s = model.steps
    return linear_v(model.encoder, x, s["in"], s["encoder.W"], s["layers.0.u"])


def avg_v(model: IntegerModel, pooled: np.ndarray) -> np.ndarray:
    return pooled * (model.steps["out_last"] / model.length) / model.steps["avg"]


def decoder_v(model: IntegerModel, avg: np.ndarray) -> np.ndarray:
    s = model.steps
    return linear_v(model.decoder, avg, s["avg"], s["decoder.W"], s["logits"])


def run_free(model: IntegerModel, x: np.ndarray) -> dict:
    """The twin end to end on int input codes x (B, L, d_in): per-layer codes of every tensor, logits."""
    twins = twin_layers(model)
    u = codes(encoder_v(model, x), model.encoder.requant.fmt)
    out = {"layers": []}
    for twin in twins:
        l, c = twin.layer, twin.layer.core
        B, L, H = u.shape
        t = {k: np.zeros((B, L, H, c.N2), dtype=np.int64) for k in ("x_re", "x_im")}
        x_re = np.zeros((B, H, c.N2), dtype=np.int64)
        x_im = np.zeros_like(x_re)
        for step in range(L):
            v_re, v_im = twin.state(x_re, x_im, u[:, step])
            x_re, x_im = codes(v_re, c.formats.x), codes(v_im, c.formats.x)
            t["x_re"][:, step], t["x_im"][:, step] = x_re, x_im
        t["u"] = u
        t["y"] = codes(twin.readout(t["x_re"], t["x_im"], u), c.formats.y)
        za, zb = twin.mix(t["y"])
        t["za"], t["zb"] = codes(za, l.mix_a.requant.fmt), codes(zb, l.mix_b.requant.fmt)
        t["act"] = codes(twin.glu(t["za"], t["zb"]), l.glu.fmt)
        t["out"] = t["act"] if l.post is None else codes(twin.post(t["act"], u), l.post.fmt)
        out["layers"].append(t)
        u = t["out"]
    out["pooled"] = u.sum(axis=1)
    out["avg"] = codes(avg_v(model, out["pooled"]), model.pool.fmt)
    out["logits"] = codes(decoder_v(model, out["avg"]), model.decoder.requant.fmt)
    out["predictions"] = np.argmax(out["logits"], axis=1)
    return out


def teacher_values(model: IntegerModel, x: np.ndarray, layers: list[dict]) -> list[dict]:
    """Per layer, the twin's pre-rounding v of every rounded tensor, each op fed the integer trace."""
    out = []
    for i, (twin, t) in enumerate(zip(twin_layers(model), layers)):
        prev_re = np.concatenate([np.zeros_like(t["x_re"][:, :1]), t["x_re"][:, :-1]], axis=1)
        prev_im = np.concatenate([np.zeros_like(t["x_im"][:, :1]), t["x_im"][:, :-1]], axis=1)
        B, L, H, N2 = prev_re.shape
        v_re, v_im = twin.state(prev_re.reshape(B * L, H, N2), prev_im.reshape(B * L, H, N2),
                                t["u"].reshape(B * L, H))
        v = {"x_re": v_re.reshape(B, L, H, N2), "x_im": v_im.reshape(B, L, H, N2),
             "y": twin.readout(t["x_re"], t["x_im"], t["u"])}
        v["za"], v["zb"] = twin.mix(t["y"])
        v["act"] = twin.glu(t["za"], t["zb"])
        if twin.layer.post is not None:
            v["out"] = twin.post(t["act"], t["u"])
        if i == 0:
            v["u"] = encoder_v(model, x)
        out.append(v)
    return out


def local_agreement(model: IntegerModel, x: np.ndarray, trace: ModelTrace) -> dict[str, dict]:
    """Teacher-forced comparison of every rounded tensor with its twin (docs/integer_spec.md, section 6).

    For tensor T with twin value v (output LSBs) and bound eps = model.eps[T]
    (+ float64 slack): the integer word must equal clip(rint(v)), or differ by
    exactly one LSB where |frac(v) - 1/2| <= eps. Returns per tensor the words
    compared, the words differing, the largest |difference| and the words
    outside the bound (``violations``, 0 when the bound holds).
    """
    if trace.layers is None:
        raise ValueError("local_agreement needs a run with trace=True")
    layers = trace.layers
    report = {}

    def compare(key: str, got: np.ndarray, v: np.ndarray, fmt: IntFormat) -> None:
        diff = np.abs(got - codes(v, fmt))
        eps = model.eps[key] + FLOAT_SLACK * (1.0 + np.abs(v))
        near = np.abs(np.abs(v - np.floor(v)) - 0.5) <= eps
        bad = (diff > 1) | ((diff == 1) & ~near)
        report[key] = {"words": int(got.size), "differ": int(np.count_nonzero(diff)),
                       "max_diff": int(diff.max()), "violations": int(np.count_nonzero(bad)),
                       "eps": model.eps[key]}

    for i, (v_layer, t) in enumerate(zip(teacher_values(model, x, layers), layers)):
        lay = model.layers[i]
        fmts = {"u": model.encoder.requant.fmt, "x_re": lay.core.formats.x, "x_im": lay.core.formats.x,
                "y": lay.core.formats.y, "za": lay.mix_a.requant.fmt, "zb": lay.mix_b.requant.fmt,
                "act": lay.glu.fmt, "out": lay.out_fmt}
        for name, v in v_layer.items():
            compare(f"layers.{i}.{name}", t[name], v, fmts[name])
    compare("avg", trace.avg, avg_v(model, trace.pooled), model.pool.fmt)
    compare("logits", trace.logits, decoder_v(model, trace.avg), model.decoder.requant.fmt)
    return report
