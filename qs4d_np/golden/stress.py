"""Stress vectors: a synthetic integer model of a trained model's shape, built so the tie rule and the
clamps show in its outputs (docs/integer_spec.md, section 7, "Stress vectors").

Why a model of its own: a word rounds on an exact tie when its accumulator's low ``R`` bits are
exactly ``2**(R-1)``. With a trained model's multipliers (``M ~ r * 2**R``, ``R`` of 30-56 bits)
that needs a term near ``2**(R-1)``, far beyond any grid: the ties are unreachable by any input
(0 of 2.2 million roundings of a trained 2-layer model were ties). So ``stress_model`` keeps what
fixes an RTL's ports and datapath (every layer's ``H`` and ``N2``, every tensor's width and grid,
residual, post op, offset and sign words, ``sig_bits``, the length) and draws new words:

* every multiplier is a **dyadic** ``m << k`` with ``m`` of ``MANTISSA_BITS`` bits, and
  ``R = p + k``: the effective gain ``m / 2**p`` has ``p`` fraction bits, so exact ties occur
  in about ``2**-p`` of the words, while ``k`` (random, up to the int64 headroom) makes the
  shifts and multipliers as wide as a trained model's;
* every output channel gets a random **drive**: its calibrated absmax is ``drive * qmax`` with
  ``drive`` log-uniform in ``DRIVE``, so some channels saturate (both rails: the inputs are
  symmetric) and some stay small, which keeps the next site's gain few-fraction-bit (ties);
* weights are random codes on their grids with a random scale per output channel (some at the
  grid edges), ``Abar`` codes with a random modulus per mode and ``|Abar_eff| <= ABAR_MAX``;
* the sigmoid table has ``SIG_COARSE`` significant bits (multiples of ``2**(F - SIG_COARSE)``),
  so the GLU product has known trailing zeros and its ties are reachable.

The stress samples are ``min(L, STRESS_LENGTH)`` steps long (the stress model folds its own
1/length into the pooling). ``stress_case`` draws the inputs first (the whole input grid, a random amplitude per sample, some
words at the edges) and builds the model site by site in dataflow order on them: each site's
words are redrawn (up to SITE_TRIES times) until its accumulators on these inputs show all four
events (a tie with an even floor, a tie with an odd floor, a clamp to qmin, a clamp to qmax);
it tries a few model seeds and keeps the first (else the best) that covers every site.
Deterministic for a seed.
"""
from __future__ import annotations

import math

import numpy as np

from qs4d_np.core.checks import check_int
from qs4d_np.golden.fixedpoint import INT64_BOUND, MAX_SHIFT, IntFormat, rounding_events
from qs4d_np.golden.layer import SSMCore
from qs4d_np.golden.model import IntegerModel, IntLayer, IntLinear, Requant

EVENTS = ("ties_even", "ties_odd", "sat_low", "sat_high")
MANTISSA_BITS = 2          # m in [2, 3]: gains with few fraction bits
DRIVE = (2.0 ** -9, 4.0)   # output absmax / qmax per channel: spread over this range
ABAR_MAX = 1.0             # |Abar_eff| of a mode: random in [ABAR_MIN, ABAR_MAX]
ABAR_MIN = 0.5
SIG_COARSE = 3             # significant bits of the stress sigmoid table
EDGE = 0.1                 # share of weight and input words at the grid edges
STRESS_LENGTH = 64         # default steps per stress sample (at most the model's length)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, size=None) -> np.ndarray:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


def dyadic(rng: np.random.Generator, gains: list[float], bounds: list[int], extra_zeros: int = 0
           ) -> tuple[list[int], int]:
    """Multipliers ``m_k << k`` and shift ``R = p + k`` with ``m_k / 2**p ~= gains[k]``.

    ``p`` is set by the smallest gain (its ``m`` gets MANTISSA_BITS bits), every ``m_k >= 1``; ``k`` is
    random between 0 and the largest value the int64 headroom (``sum bounds * M < 2**63``, every
    M < 2**63) and R <= 62 allow. ``extra_zeros``: known trailing zero bits of every term (the coarse
    sigmoid table's), added to the shift so the gain applies to the term divided by them.
    """
    p = max(0, MANTISSA_BITS - 1 - math.floor(math.log2(min(gains))) - extra_zeros) + extra_zeros
    m = [max(1, round(g * 2.0 ** p)) for g in gains]
    k_max = 0
    while (p + k_max + 1 <= MAX_SHIFT and max(m) << (k_max + 1) < INT64_BOUND
           and sum(b * (mk << (k_max + 1)) for b, mk in zip(bounds, m)) < INT64_BOUND):
        k_max += 1
    if sum(b * mk for b, mk in zip(bounds, m)) >= INT64_BOUND or p > MAX_SHIFT:
        raise ValueError(f"stress gains {gains} with bounds {bounds} do not fit int64")
    k = int(rng.integers(0, k_max + 1))
    return [mk << k for mk in m], p + k


def _codes(rng: np.random.Generator, fmt: IntFormat, shape: tuple[int, ...], scale: np.ndarray | float
           ) -> np.ndarray:
    """Random codes within +-scale (broadcast over the last axis), EDGE of them at a grid edge."""
    lim = np.minimum(np.maximum(np.asarray(scale, dtype=np.float64), 1.0), fmt.maxabs)
    v = np.rint(rng.uniform(-1.0, 1.0, shape) * lim).astype(np.int64)
    edge = rng.random(shape) < EDGE
    v = np.where(edge, np.where(rng.random(shape) < 0.5, fmt.qmin, fmt.qmax), v)
    return np.clip(v, fmt.qmin, fmt.qmax)


def _drives(rng: np.random.Generator, shape) -> np.ndarray:
    """Per-channel drives spread over DRIVE: log-spaced, shuffled, jittered (so every site has both
    saturating and small channels); one channel draws log-uniformly."""
    n = int(np.prod(shape))
    lo, hi = np.log2(DRIVE[0]), np.log2(DRIVE[1])
    grid = np.linspace(lo, hi, n) if n > 1 else rng.uniform(lo, hi, 1)
    return 2.0 ** (rng.permutation(grid) + rng.uniform(-0.5, 0.5, n)).reshape(shape)


def _channel_scales(rng: np.random.Generator, fmt: IntFormat, n: int) -> np.ndarray:
    return _log_uniform(rng, 1.0, max(fmt.maxabs, 1.0) + 1e-9, n)


def _absmax(v: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.maximum(np.abs(v).max(axis=axes), 1).astype(np.float64)


def _requant(rng, name: str, terms_absmax: list[np.ndarray], bounds: list[int], fmt: IntFormat,
             extra_zeros: int = 0, offset: bool = False, sign: bool = False) -> Requant:
    """A Requant whose channel c maps the terms' calibrated absmax to drive_c * qmax."""
    C = terms_absmax[0].shape[0]
    drive = _drives(rng, C)
    Ms, R, off = [[] for _ in terms_absmax], [], []
    for c in range(C):
        target = drive[c] * fmt.maxabs / len(terms_absmax)
        m, r = dyadic(rng, [target / float(a[c]) for a in terms_absmax], bounds, extra_zeros)
        for j, mk in enumerate(m):
            Ms[j].append(mk)
        R.append(r)
        if offset:  # an offset of up to a quarter of the grid, at the sum's scale (2**R per output LSB)
            off.append(int(rng.integers(-fmt.maxabs // 4, fmt.maxabs // 4 + 1)) << r)
    Ms = [np.array(m, dtype=np.int64) for m in Ms]
    R = np.array(R, dtype=np.int64)
    if offset:  # keep the headroom: shrink the offset where sum_k bound_k * M_k + |offset| would not fit
        room = INT64_BOUND - 1 - sum(b * M.astype(object) for b, M in zip(bounds, Ms))
        off = [int(np.sign(o)) * min(abs(o), int(room[c])) for c, o in enumerate(off)]
    return Requant(name, Ms, R, fmt, bounds, offset=np.array(off, dtype=np.int64) if offset else None,
                   sign=np.where(rng.random(C) < 0.5, -1, 1).astype(np.int64) if sign else None)


SITE_TRIES = 32  # draws per rounding site before keeping the best


def _covered(acc: np.ndarray, shift: np.ndarray, fmt: IntFormat) -> int:
    """How many of the four EVENTS occur when ``acc`` is rounded by ``shift`` onto ``fmt``."""
    ev = rounding_events(acc, shift, fmt)
    return sum(ev[e] > 0 for e in EVENTS)


def _best_of(rng, draw, score, full: int = len(EVENTS)):
    """Draw a site up to SITE_TRIES times; the first draw whose score reaches ``full``, else the best."""
    best = None
    for _ in range(SITE_TRIES):
        site = draw(rng)
        got = score(site)
        if best is None or got > best[0]:
            best = (got, site)
        if got >= full:
            break
    return best[1]


def _linear(rng, name: str, a: np.ndarray, w_fmt: IntFormat, in_fmt: IntFormat, d_out: int,
            out_fmt: IntFormat) -> IntLinear:
    """A random IntLinear: W codes scaled per output column, small bias, calibrated on inputs a."""
    d_in = a.shape[-1]

    def draw(rng) -> IntLinear:
        W = _codes(rng, w_fmt, (d_in, d_out), _channel_scales(rng, w_fmt, d_out))
        # unit columns (codes -1, 0, 1): their sums stay near the input's range, so their gains
        # have few fraction bits and ties show even where there are few words (logits)
        unit = rng.random(d_out) < 0.5
        W[:, unit] = rng.integers(-1, 2, (d_in, int(unit.sum())))
        acc = a.reshape(-1, d_in) @ W
        b = np.rint(rng.uniform(-0.25, 0.25, d_out) * _absmax(acc, (0,))).astype(np.int64)
        bound = d_in * w_fmt.maxabs * in_fmt.maxabs + int(np.abs(b).max())
        rq = _requant(rng, name, [_absmax(acc + b, (0,))], [bound], out_fmt)
        return IntLinear(name, W, b, w_fmt, in_fmt, rq.M[0], rq.R, out_fmt)

    return _best_of(rng, draw, lambda lin: _covered(lin(a, return_acc=True)[2], lin.requant.R, out_fmt))


def _core_accs(core: SSMCore, u: np.ndarray) -> dict[str, np.ndarray]:
    """The core run over u (B, L, H) with its accumulators: x_re, x_im, acc_re, acc_im, acc_y."""
    B, L, H = u.shape
    x_re = np.zeros((B, H, core.N2), dtype=np.int64)
    x_im = np.zeros_like(x_re)
    keep = {k: [] for k in ("x_re", "x_im", "acc_re", "acc_im", "acc_y")}
    for t in range(L):
        x_re, x_im, _, _, _, _, a_re, a_im, a_y = core.step(x_re, x_im, u[:, t], return_acc=True)
        for k, v in zip(keep, (x_re, x_im, a_re, a_im, a_y)):
            keep[k].append(v)
    return {k: np.stack(v, axis=1) for k, v in keep.items()}


def _core(rng, like: SSMCore, u: np.ndarray) -> SSMCore:
    """A random core of ``like``'s formats and shape, stable modes, calibrated on u (B, L, H).

    Drawn in two sites: the state (Abar, Bbar, state multipliers; scored on x_re and x_im), then the
    readout (C, D, output multipliers; scored on y) on the chosen state.
    """
    f, H, N2 = like.formats, like.H, like.N2
    ax, bu = f.Abar.maxabs * f.x.maxabs, f.Bbar.maxabs * f.u.maxabs
    cx = N2 * f.C.maxabs * f.x.maxabs
    keys = ("m_a_re", "m_a_im_to_re", "m_a_im_to_im", "m_b_re", "m_b_im")
    ones = np.ones(H, dtype=np.int64)

    def draw_state(rng) -> dict[str, np.ndarray]:
        rho = rng.uniform(ABAR_MIN, ABAR_MAX, (H, N2))
        theta = rng.uniform(0, 2 * np.pi, (H, N2))
        mod = _log_uniform(rng, 1.0, f.Abar.maxabs + 1e-9, (H, N2))
        w = {"Abar_re": np.clip(np.rint(mod * np.cos(theta)), f.Abar.qmin, f.Abar.qmax).astype(np.int64),
             "Abar_im": np.clip(np.rint(mod * np.sin(theta)), f.Abar.qmin, f.Abar.qmax).astype(np.int64),
             "Bbar_re": _codes(rng, f.Bbar, (H, N2), _channel_scales(rng, f.Bbar, N2)),
             "Bbar_im": _codes(rng, f.Bbar, (H, N2), _channel_scales(rng, f.Bbar, N2))}
        a_abs = np.maximum(np.hypot(w["Abar_re"], w["Abar_im"]), 1.0)
        # float calibration of the state with input gain 1: x = Abar_eff x + (B_re + i B_im) u
        a_eff = (w["Abar_re"] + 1j * w["Abar_im"]) * (rho / a_abs)
        x = np.zeros(u.shape[:1] + (H, N2), dtype=np.complex128)
        peak = np.ones((H, N2))
        for t in range(u.shape[1]):
            x = a_eff * x + (w["Bbar_re"] + 1j * w["Bbar_im"]) * u[:, t, :, None]
            peak = np.maximum(peak, np.maximum(np.abs(x.real), np.abs(x.imag)).max(axis=0))
        drive = _drives(rng, (H, N2))
        w.update({k: np.zeros((H, N2), dtype=np.int64) for k in keys + ("r_x",)})
        for h in range(H):
            for n in range(N2):
                g_a = rho[h, n] / a_abs[h, n]
                g_b = drive[h, n] * f.x.maxabs / peak[h, n]
                m, r = dyadic(rng, [g_a, g_a, g_a, g_b, g_b], [ax, ax, ax, bu, bu])
                for key, mk in zip(keys, m):
                    w[key][h, n] = mk
                w["r_x"][h, n] = r
        return w

    def probe(w: dict, **readout) -> SSMCore:
        # without a readout: gain ~0 and the largest shift (y is not looked at)
        zeros = np.zeros((H, N2), dtype=np.int64)
        readout = readout or dict(C_re=zeros, C_im=zeros, D=0 * ones, m_c_re=ones, m_c_im=ones, m_d=ones,
                                  r_y=ones * MAX_SHIFT)
        return SSMCore(f, **w, **readout)

    def score_state(w: dict) -> int:
        run = _core_accs(probe(w), u)
        return _covered(run["acc_re"], w["r_x"], f.x) + _covered(run["acc_im"], w["r_x"], f.x)

    state = _best_of(rng, draw_state, score_state, full=2 * len(EVENTS))
    run = _core_accs(probe(state), u)

    def draw_readout(rng) -> dict[str, np.ndarray]:
        r = {"C_re": _codes(rng, f.C, (H, N2), _channel_scales(rng, f.C, N2)),
             "C_im": _codes(rng, f.C, (H, N2), _channel_scales(rng, f.C, N2)),
             "D": _codes(rng, f.D, (H,), _channel_scales(rng, f.D, H))}
        S_re = (r["C_re"] * run["x_re"]).sum(axis=-1)
        S_im = (r["C_im"] * run["x_im"]).sum(axis=-1)
        rq = _requant(rng, "y", [_absmax(S_re, (0, 1)), _absmax(S_im, (0, 1)), _absmax(r["D"] * u, (0, 1))],
                      [cx, cx, f.D.maxabs * f.u.maxabs], f.y)
        return {**r, "m_c_re": rq.M[0], "m_c_im": rq.M[1], "m_d": rq.M[2], "r_y": rq.R}

    def score_readout(r: dict) -> int:
        return _covered(_core_accs(probe(state, **r), u)["acc_y"], r["r_y"], f.y)

    return probe(state, **_best_of(rng, draw_readout, score_readout))


def _sig_table(rng, zb_fmt: IntFormat, sig_bits: int) -> tuple[np.ndarray, int]:
    """A monotone sigmoid table with SIG_COARSE significant bits; also its trailing zero bits."""
    coarse = min(SIG_COARSE, sig_bits)
    zeros = sig_bits - coarse
    span = float(rng.uniform(4.0, 16.0)) / max(zb_fmt.maxabs, 1)
    z = np.arange(zb_fmt.qmin, zb_fmt.qmax + 1) * span
    lut = np.rint(0.5 * (1.0 + np.tanh(0.5 * z)) * 2.0 ** coarse).astype(np.int64) << zeros
    return lut, zeros


def _layer(rng, like: IntLayer, u: np.ndarray) -> tuple[IntLayer, np.ndarray]:
    core = _core(rng, like.core, u)
    y = core.run(u).y
    H = core.H
    mix_a = _linear(rng, "mix_a", y, like.mix_a.w_fmt, core.formats.y, H, like.mix_a.requant.fmt)
    mix_b = _linear(rng, "mix_b", y, like.mix_b.w_fmt, core.formats.y, H, like.mix_b.requant.fmt)
    za, _ = mix_a(y)
    zb, _ = mix_b(y)
    zb_fmt = mix_b.requant.fmt
    bound = mix_a.requant.fmt.maxabs << like.sig_bits

    def draw_glu(rng) -> tuple[np.ndarray, Requant, np.ndarray]:
        lut, zeros = _sig_table(rng, zb_fmt, like.sig_bits)
        prod = za * lut[zb - zb_fmt.qmin]
        return lut, _requant(rng, "glu", [_absmax(prod, (0, 1))], [bound], like.glu.fmt, extra_zeros=zeros), prod

    lut, glu, prod = _best_of(rng, draw_glu, lambda g: _covered(g[1]([g[2]], return_acc=True)[2], g[1].R, g[1].fmt))
    act, _ = glu([prod])
    post, out = None, act
    if like.post is not None:
        terms = [act, u] if like.residual else [act]
        fmts = [like.glu.fmt, core.formats.u][:len(terms)]
        post = _best_of(rng, lambda rng: _requant(
            rng, "post", [_absmax(t, (0, 1)) for t in terms], [f.maxabs for f in fmts], like.post.fmt,
            offset=like.post.offset is not None, sign=like.post.sign is not None),
            lambda rq: _covered(rq(terms, return_acc=True)[2], rq.R, rq.fmt))
        out, _ = post(terms)
    layer = IntLayer(core, mix_a, mix_b, lut, like.sig_bits, glu, post, like.residual)
    return layer, out


def stress_model(model: IntegerModel, x_calib: np.ndarray, seed: int) -> IntegerModel:
    """A random integer model with ``model``'s shape, widths and grids (see the module doc).

    ``x_calib`` (B, L, d_in) int64 on ``model.in_fmt`` calibrates the drives; L is the stress
    model's length (the pooling's term bound is L * maxabs(out)).
    """
    rng = np.random.default_rng(seed)
    enc = model.encoder
    encoder = _linear(rng, "encoder", x_calib, enc.w_fmt, model.in_fmt, enc.W.shape[1], enc.requant.fmt)
    u, _ = encoder(x_calib)
    layers = []
    for like in model.layers:
        layer, u = _layer(rng, like, u)
        layers.append(layer)
    pooled = u.sum(axis=1)
    bound = x_calib.shape[1] * model.layers[-1].out_fmt.maxabs
    pool = _best_of(rng, lambda rng: _requant(rng, "pool", [_absmax(pooled, (0,))], [bound], model.pool.fmt),
                    lambda rq: _covered(rq([pooled], return_acc=True)[2], rq.R, rq.fmt))
    avg, _ = pool([pooled])
    dec = model.decoder
    decoder = _linear(rng, "decoder", avg, dec.w_fmt, model.pool.fmt, dec.W.shape[1], dec.requant.fmt)
    return IntegerModel(model.in_fmt, encoder, layers, pool, decoder, x_calib.shape[1])


def random_inputs(rng: np.random.Generator, fmt: IntFormat, count: int, length: int, d_in: int) -> np.ndarray:
    """Candidate inputs (count, length, d_in) on the whole grid: random amplitude per sample, edges."""
    amp = _log_uniform(rng, 1.0, fmt.maxabs + 1e-9, (count, 1, 1))
    return _codes(rng, fmt, (count, length, d_in), amp)


def event_counts(model: IntegerModel, x: np.ndarray, run=None) -> dict[str, dict[str, int]]:
    """Per rounding site of ``model`` (``IntegerModel.shifts``), its EVENTS counted over a run on x.

    ``run``: an existing ``model.run(x, trace_acc=True)`` to reuse.
    """
    run = run if run is not None else model.run(x, trace_acc=True)
    out = {}
    for name, (shift, fmt) in model.shifts().items():
        if name in ("avg", "logits"):
            acc = run.acc[name]
        else:
            i, t = name.split(".")[1:]
            acc = run.layers[int(i)]["acc_" + t]
        out[name] = rounding_events(acc, shift, fmt)
    return out


def missing_events(counts: dict[str, dict[str, int]]) -> dict[str, list[str]]:
    """Sites whose counts lack an event: {site: [missing event names]} (empty: full coverage)."""
    return {s: [e for e in EVENTS if c.get(e, 0) == 0] for s, c in counts.items()
            if any(c.get(e, 0) == 0 for e in EVENTS)}


def stress_case(model: IntegerModel, samples: int, seed: int = 0, tries: int = 8, length: int | None = None
                ) -> tuple[IntegerModel, np.ndarray, dict[str, dict[str, int]]]:
    """A stress model of ``model``, ``samples`` inputs and their event counts per site.

    ``length``: steps per stress sample, default ``min(model.length, STRESS_LENGTH)`` (the words
    need not be a trained model's, so a short sequence exercises every rule at a fraction of the
    cost of 784 steps; the stress model folds its own 1/length into the pooling). Tries model seeds
    ``seed .. seed + tries - 1`` (each site of a model is already redrawn until its events show on
    these inputs); returns the first with every event at every site, else the one with the fewest
    missing.
    """
    samples = check_int("samples", samples, min_value=1)
    length = min(model.length, STRESS_LENGTH) if length is None else check_int("length", length, min_value=1)
    best = None
    for s in range(seed, seed + check_int("tries", tries, min_value=1)):
        rng = np.random.default_rng([s, 1])
        x = random_inputs(rng, model.in_fmt, samples, length, model.d_input)
        stress = stress_model(model, x, s)
        counts = event_counts(stress, x)
        missing = sum(len(v) for v in missing_events(counts).values())
        if best is None or missing < best[0]:
            best = (missing, stress, x, counts)
        if missing == 0:
            break
    return best[1], best[2], best[3]
