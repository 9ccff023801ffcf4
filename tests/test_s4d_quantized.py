"""S4D's quantization wiring (qs4d_np.ssm.core, ssm.params, quant.state): checkpoint keys, effective parameters,
quantized_recurrent(calib) and streaming a quantized layer bit for bit."""
import copy
import gc
import weakref

import numpy as np
import pytest

import qs4d_np.core.linear as linear_module
import qs4d_np.ssm.core as core_module
from qs4d_np import S4D, S4DModel
from qs4d_np.quant.config import QuantConfig
from qs4d_np.quant.quantizer import Quantizer
from qs4d_np.quant.scan import quant_scan

RUNNING = {"act": {"scale_mode": "running"}, "state": {"scale_mode": "running"}}


def jitter(layer, seed=5):
    """Move the SSM parameters off the init's exact grid values (Re(A) = -1/2 everywhere)."""
    rng = np.random.default_rng(seed)
    for name, p in layer.params.items():
        if name.split(".")[-1] in ("log_A_real", "A_imag", "log_dt", "Abar_rho", "Abar_theta"):
            p += (0.1 * rng.standard_normal(p.shape)).astype(p.dtype)
    return layer


def calibrated(dtype=np.float64, abar="continuous", per_channel=False, state=64, clip=None, mixing=None,
               activation="gelu", rounding="half_even", act=None, H=3, N=6, target_options=RUNNING,
               dyadic=False):
    """A quantized layer whose state / act ranges were calibrated by one training forward, and its input
    (``dyadic``: power-of-two scales everywhere and an input of quarters, so that the state update is
    exact and rounding ties occur)."""
    cfg = QuantConfig(16, A=64, state=state, act=act, per_channel=per_channel, rounding=rounding,
                      power_of_two=dyadic, target_options=target_options)
    layer = jitter(S4D(H, N, quant=cfg, abar=abar, dtype=dtype, seed=1, state_clip=clip, mixing=mixing,
                       activation=activation, layer=0))
    rng = np.random.default_rng(7)
    u = (rng.integers(-8, 9, (3, 25, H)) / 4 if dyadic else rng.standard_normal((3, 25, H))).astype(dtype)
    layer.forward(u, training=True, mode="recurrent")
    return layer, u


def stream(layer, u):
    """Step the layer over u (batch, L, H); returns y (batch, L, H) and the states (L, batch, H, M)."""
    state, ys, states = layer.initial_state(u.shape[0]), [], []
    for t in range(u.shape[1]):
        y_t, state = layer.step(u[:, t], state)
        ys.append(y_t)
        states.append(state)
    return np.stack(ys, axis=1), np.stack(states)


# -- the quantizer children and checkpoint keys ------------------------------------
# Pinned from the layout before the wiring moved out of s4d.py (commit fbd48b8): per layer i the
# quantizer children "i:<key>" and the checkpoint arrays of the S4D quantizers, after one training
# forward in each mode. Checkpoints written before the move must keep loading.
CONFIGS = {
    "all": QuantConfig(all=16, target_options={"act": {"scale_mode": "learned"}, "state": {"scale_mode": "running"},
                                               "C": {"scale_mode": "learned"}, "dt": {"scale_mode": "learned"}}),
    "per_layer": QuantConfig(C=[8, "float"], A={1: 64}, state=[16, None], act={0: 8},
                             target_options={"act": {"scale_mode": "running"}, "A": {"scale_mode": "learned"}}),
}
_ALL_BUFFERS = ("buffers/{i}:C.step_ready buffers/{i}:K.running_hi buffers/{i}:K.running_lo buffers/{i}:act.step_ready "
                "{dt}buffers/{i}:u.running_hi buffers/{i}:u.running_lo buffers/{i}:x.running_hi "
                "buffers/{i}:x.running_lo")
_ALL_PARAMS = "params/{i}:C.step params/{i}:act.step{dtp}"


def _all_layout(continuous: bool) -> tuple[str, str]:
    children = " ".join(f"{i}:{k}" for i in (0, 1) for k in
                        (("A", "Abar") if continuous else ("Abar",)) + ("B", "C", "D", "K", "act")
                        + (("dt",) if continuous else ()) + ("linear", "u", "x"))
    buffers = [_ALL_BUFFERS.format(i=i, dt=f"buffers/{i}:dt.step_ready " if continuous else "") for i in (0, 1)]
    params = [_ALL_PARAMS.format(i=i, dtp=f" params/{i}:dt.step" if continuous else "") for i in (0, 1)]
    return children, " ".join(sorted(" ".join(buffers + params).split()))


EXPECTED_LAYOUT = {
    ("all", "continuous"): _all_layout(True),
    ("all", "discrete"): _all_layout(False),
    ("all", "frozen"): _all_layout(False),
    ("per_layer", "continuous"): ("0:C 0:K 0:act 0:u 0:x 1:A 1:Abar",
                                  "buffers/0:act.running_hi buffers/0:act.running_lo buffers/1:A.step_ready "
                                  "buffers/1:Abar.step_ready params/1:A.step params/1:Abar.step"),
    ("per_layer", "discrete"): ("0:C 0:K 0:act 0:u 0:x 1:Abar",
                                "buffers/0:act.running_hi buffers/0:act.running_lo buffers/1:Abar.step_ready "
                                "params/1:Abar.step"),
}
EXPECTED_LAYOUT[("per_layer", "frozen")] = EXPECTED_LAYOUT[("per_layer", "discrete")]


@pytest.mark.parametrize("config, abar", sorted(EXPECTED_LAYOUT))
def test_quantizer_children_and_checkpoint_keys_are_unchanged(config, abar, tmp_path):
    model = S4DModel(2, 3, d_model=3, d_state=4, n_layers=2, dropout=0.0, seed=0, quant=CONFIGS[config], abar=abar)
    x = np.random.default_rng(0).standard_normal((2, 5, 2))
    for mode in ("conv", "recurrent"):
        model.forward(x, training=True, mode=mode)
    short = lambda name: name.replace("layers.", "").replace(".ssm.quant_", ":")  # noqa: E731
    children = " ".join(sorted(short(n) for n, m in model.modules() if isinstance(m, Quantizer) and ".ssm." in n))
    arrays = " ".join(sorted(short(k) for k in model.state_arrays() if ".ssm.quant_" in k))
    assert (children, arrays) == EXPECTED_LAYOUT[(config, abar)]
    for i, block in enumerate(model.blocks):  # q maps every key to its child (or None)
        for key, q in block.ssm.q.items():
            assert q is {**block.ssm.children(), **block.ssm.core.children()}.get(f"quant_{key}"), (i, key)
    model.save(tmp_path / "m")
    loaded = S4DModel.load(tmp_path / "m")
    for mode in ("conv", "recurrent"):
        assert np.array_equal(loaded.forward(x, mode=mode), model.forward(x, mode=mode))


# -- effective parameters and accessors -------------------------------------------------
@pytest.mark.parametrize("abar", ["continuous", "discrete", "frozen"])
def test_effective_ssm_is_what_the_recurrent_forward_computes_with(abar):
    layer, u = calibrated(np.float64, abar, per_channel=True, clip=4.0, activation=None, act="float")
    eff = layer.effective_ssm()
    for key in ("Abar", "Bbar", "C", "D"):
        value = getattr(eff, key)
        assert value.dtype == (np.float64 if key == "D" else np.complex128), key
        assert value.shape == ((3,) if key == "D" else (3, 3)), key
    # the core (no activation, mixing or act quantizer here) run on these values is the forward
    state = layer.q["x"].scan_scales(None, eff.Abar, eff.Bbar, 4.0)
    y, _ = quant_scan(u, eff.Abar, eff.Bbar, eff.C, eff.D, state, 4.0)
    assert np.array_equal(y, layer.forward(u, mode="recurrent"))
    # the pre-quantization values are what the Abar / B quantizers turn into the quantized ones
    assert np.array_equal(layer.q["Abar"].forward(eff.Abar_float), eff.Abar)
    assert np.array_equal(layer.q["B"].forward(eff.Bbar_float), eff.Bbar)
    assert not np.array_equal(eff.Abar, eff.Abar_float) and not np.array_equal(eff.C, layer.params["C"])
    if abar != "continuous":
        assert np.array_equal(eff.Bbar_float, layer.params["Bbar"].astype(np.complex128))


def test_effective_ssm_in_conv_mode_and_of_a_float_layer(monkeypatch):
    layer = jitter(S4D(3, 6, quant=QuantConfig(A=8, C=8, D=8), dtype=np.float64, seed=2))
    seen = {}
    real = core_module.ssm_kernel
    monkeypatch.setattr(core_module, "ssm_kernel",
                        lambda Ct, Abar, L: seen.update(Ct=Ct, Abar=Abar) or real(Ct, Abar, L))
    layer.forward(np.ones((1, 4, 3)), mode="conv")
    eff = layer.effective_ssm("conv")
    assert np.array_equal(eff.Abar, seen["Abar"]) and np.array_equal(eff.C * eff.Bbar, seen["Ct"])
    assert np.array_equal(eff.Abar, eff.Abar_float)  # conv mode quantizes A, not Abar
    assert not np.array_equal(eff.Abar, layer.discrete().Abar)  # ... and that moved Abar
    assert np.array_equal(eff.D, layer.params["D"])  # D stays float in conv mode
    float_layer = S4D(3, 6, seed=2)
    eff, d = float_layer.effective_ssm(), float_layer.discrete()
    assert np.array_equal(eff.Abar, d.Abar) and np.array_equal(eff.Bbar, d.Bbar)
    assert np.array_equal(eff.C, float_layer.params["C"]) and eff.C.dtype == np.complex128
    with pytest.raises(ValueError, match="mode must be one of"):
        float_layer.effective_ssm("scan")


def test_mixing_weight_and_act_quantizer_are_what_the_forward_uses(monkeypatch):
    layer, u = calibrated(np.float32, mixing="glu", act=16)
    used = []
    real = linear_module.matmul  # the mixing product is its Linear's (Linear.product)
    monkeypatch.setattr(linear_module, "matmul", lambda a, b, out=None: used.append(b) or real(a, b, out))
    y = layer.forward(u, mode="recurrent")
    W = layer.mixing_weight()
    assert W.shape == (3, 6) and W.dtype == np.float32 and np.array_equal(W, used[0])
    assert not np.array_equal(W, layer.params["mixing.linear.weight"])  # quantized
    W[:] = 0  # a copy: the parameter is untouched
    assert np.array_equal(layer.forward(u, mode="recurrent"), y)
    assert layer.act_quantizer is dict(layer.children())["quant_act"]
    float_layer = S4D(3, 4, seed=0)
    assert np.array_equal(float_layer.mixing_weight(), float_layer.params["mixing.linear.weight"])
    assert float_layer.act_quantizer is None and S4D(3, 4, mixing=None).mixing_weight() is None


def test_inspection_keeps_a_pending_backward(monkeypatch):
    layer, u = calibrated(np.float64, mixing="glu", act=16)
    g = np.random.default_rng(3).standard_normal(u.shape)
    ranges = {q: {k: v.copy() for k, v in q.buffers.items()} for q in (layer.q["x"], layer.q["act"])}
    layer.forward(u, training=True, mode="recurrent")
    want_du = layer.backward(g)
    want = {k: v.copy() for k, v in layer.grads.items()}
    for q, buffers in ranges.items():  # a training forward moves the running ranges: start from the same
        q.buffers.update(buffers)
    layer.forward(u, training=True, mode="recurrent")
    layer.effective_ssm()
    layer.mixing_weight()
    layer.quantized_recurrent(calib=u[:1, :7])
    stream(layer, u[:, :4])
    assert np.array_equal(layer.backward(g), want_du)
    for k, v in layer.grads.items():
        assert np.array_equal(v, want[k]), k


# -- quantized_recurrent(calib) --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantized_recurrent_resolves_absmax_ranges_on_calib(dtype, per_channel):
    layer, u = calibrated(dtype, per_channel=per_channel, clip=3.0, act=16, target_options={})  # all absmax
    with pytest.raises(ValueError, match=r"quantizer 'x\[0\]' \(target 'state', scale_mode='absmax'\) takes its "
                                         r"range from each tensor it quantizes; pass calib"):
        layer.quantized_recurrent()
    y = layer.forward(u, mode="recurrent")
    ex = layer.quantized_recurrent(calib=u)
    act = ex["act"]
    H = layer.d_model
    assert act["inv_scale"].dtype == dtype and act["inv_scale"].shape == ((H,) if per_channel else (1,))
    # the exported codes, state and act scales run through the scan and the act rule give the forward
    params = [ex[key].dequantize() for key in ("Abar", "Bbar", "C", "D")]
    core, _ = quant_scan(u, *params, ex["state"], ex["clip"])
    out = layer.activation.forward(core)  # GELU: the act range is that of the layer output, not the core's
    inv, zp = act["inv_scale"], act["zero_point"].astype(dtype)
    g = act["grid"]
    assert np.array_equal((np.clip(np.rint(out * inv) + zp, g.qmin, g.qmax) - zp) / inv, y)
    # another batch gives other ranges, as the forward would
    other = layer.quantized_recurrent(calib=2 * u)
    assert not np.array_equal(other["act"]["inv_scale"], inv)
    assert not np.array_equal(other["state"].inv, ex["state"].inv)
    with pytest.raises(ValueError, match=r"calib must have shape \(batch, length, 3\)"):
        layer.quantized_recurrent(calib=u[..., :2])


def test_quantized_recurrent_static_ranges_ignore_calib():
    layer, u = calibrated(np.float32, act=16)
    ex, with_calib = layer.quantized_recurrent(), layer.quantized_recurrent(calib=5 * u)
    assert np.array_equal(ex["state"].inv, with_calib["state"].inv)
    assert np.array_equal(ex["act"]["inv_scale"], with_calib["act"]["inv_scale"])
    assert ex["act"]["inv_scale"].dtype == np.float32
    for key in ("Abar", "Bbar", "C", "D"):
        assert np.array_equal(ex[key].q, with_calib[key].q), key
    # a typed record; keys read the same fields (the former dict's interface)
    assert ex.state is ex["state"] and ex.act.inv_scale is ex["act"]["inv_scale"] and ex.clip == np.inf
    assert set(ex.keys()) == {"Abar", "Bbar", "C", "D", "state", "clip", "linear", "linear_bias", "act"}
    with pytest.raises(KeyError):
        ex["bogus"]


# -- streaming ---------------------------------------------------------------------------------
STREAM_CASES = [  # (abar, state target, clip): every case runs the quantized-state scan
    ("continuous", 64, None), ("continuous", 64, 0.6), ("continuous", "float", 0.6),
    ("discrete", 64, 0.6), ("frozen", 64, None), ("frozen", "float", 0.6)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("abar, state, clip", STREAM_CASES)
def test_quantized_step_reproduces_the_recurrent_forward_bit_for_bit(dtype, per_channel, abar, state, clip):
    # a fine state grid, more modes and no act quantizer: the output shows the state's and the
    # read-out's last bits (the act quantizer is covered below)
    layer, u = calibrated(dtype, abar, per_channel, state if state == "float" else 2**16, clip, act="float", N=16)
    y = layer.forward(u, mode="recurrent")
    y_step, states = stream(layer, u)
    assert y_step.dtype == dtype and states.dtype == layer.cdtype
    assert np.array_equal(y_step, y)
    if clip is not None:
        assert np.abs(states.real).max() <= clip and np.abs(states.imag).max() <= clip
    if state != "float":  # the state returned is the quantized state: codes on the grid
        st = layer.quantized_recurrent()["state"]
        inv = st.per_channel_inv(layer.d_model, np.dtype(dtype))
        g = st.spec.code_grid
        for part, i in ((states.real, 0), (states.imag, 1)):
            codes = np.rint(part * inv[:, i, None])
            assert np.array_equal(codes / inv[:, i, None], part) and codes.min() >= g.qmin and codes.max() <= g.qmax


@pytest.mark.parametrize("rounding", ["half_up", "half_away", "floor"])
def test_quantized_step_other_rounding_rules(rounding):
    # exact dyadic arithmetic on a coarse state grid makes ties common, of either sign
    opts = {**RUNNING, "state": {"scale_mode": "fixed", "fixed_range": 2.0}}
    layer, u = calibrated(np.float32, state=16, rounding=rounding, act="float", target_options=opts, dyadic=True)
    assert np.array_equal(stream(layer, u)[0], layer.forward(u, mode="recurrent"))


def test_quantized_step_without_state_target_or_clip_agrees_to_rounding():
    # Then the forward runs kernels.scan, compiled with fastmath reassoc: its sums over modes may be
    # reordered, so the step (the same arithmetic in order) agrees to rounding only. Bound: a
    # reordered sum of M terms moves by <= (M - 1) eps sum|terms|, the state update likewise; the
    # measured worst case here is ~4 ulp of max|y|, the bound 16 * M ulp.
    for dtype in (np.float32, np.float64):
        layer, u = calibrated(dtype, state="float", act="float", N=16)
        y = layer.forward(u, mode="recurrent")
        y_step, _ = stream(layer, u)
        M = layer.d_state // 2
        assert np.abs(y_step - y).max() <= 16 * M * np.finfo(dtype).eps * np.abs(y).max()


def test_quantized_step_with_mixing():
    # The mixing's product runs in BLAS, whose sums depend on the number of rows (measured with
    # OpenBLAS: a (B, H) @ (H, 2H) row differs from the same row of (B*L, H) @ (H, 2H) by up to
    # ~5 ulp at H = 16): the core is bit for bit, the mixing output agrees to that rounding, and
    # after the act quantizer a code can move by one step where a value sits on a rounding edge.
    for dtype in (np.float32, np.float64):
        layer, u = calibrated(dtype, per_channel=True, clip=2.0, mixing="glu", activation=None, act="float", H=16)
        y = layer.forward(u, mode="recurrent")
        y_step, _ = stream(layer, u)
        assert np.abs(y_step - y).max() <= 4 * layer.d_model * np.finfo(dtype).eps * max(1.0, np.abs(y).max())
        layer, u = calibrated(dtype, per_channel=True, clip=2.0, mixing="glu", activation=None, act=16, H=16)
        inv = layer.quantized_recurrent()["act"]["inv_scale"]
        codes = np.rint(layer.forward(u, mode="recurrent") * inv)
        assert np.abs(np.rint(stream(layer, u)[0] * inv) - codes).max() <= 1


def test_streaming_refuses_data_dependent_and_unset_ranges():
    layer, u = calibrated(np.float32, act=16, target_options={"state": {"scale_mode": "running"}})  # act absmax
    with pytest.raises(ValueError, match=r"step\(\): quantizer 'act\[0\]' \(target 'act', scale_mode='absmax'\) "
                                         r"takes its range from the whole sequence.*qs4d_np.train.ptq.calibrate"):
        layer.step(u[:, 0], layer.initial_state(3))
    fresh = S4D(3, 4, quant=QuantConfig(8, target_options=RUNNING), layer=0)
    with pytest.raises(RuntimeError, match=r"Quantizer 'x\[0\]' \(scale_mode='running'\) has no calibrated range"):
        fresh.step(np.zeros((1, 3)), fresh.initial_state(1))
    learned = S4D(3, 4, quant=QuantConfig(8, act="float", target_options={"state": {"scale_mode": "learned"}}))
    with pytest.raises(RuntimeError, match="has no step yet"):
        learned.step(np.zeros((1, 3)), learned.initial_state(1))
    with pytest.raises(ValueError, match=r"state must have shape \(3, 3, 3\)"):
        layer.step(u[:, 0], np.zeros((3, 3, 2), dtype=np.complex64))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_frozen_quantizer_rounds_and_saturates_like_the_kernels_round_code(dtype):
    # streaming's frozen quantizer runs the forward's own kernel: every rounding rule, ties of both
    # signs, values next to a tie, -0.0, and saturation at both ends of the grid
    from qs4d_np.kernels.fake_quant import round_code
    from qs4d_np.quant.fake import QuantSpec
    from qs4d_np.quant.frozen import FrozenQuant
    from qs4d_np.quant.grids import ROUNDING
    rng = np.random.default_rng(0)
    k = rng.integers(-50, 50, 40).astype(dtype)
    v = np.concatenate([k, k + dtype(0.5), k - dtype(0.5), rng.uniform(-80, 80, 40).astype(dtype),
                        np.nextafter(k + dtype(0.5), dtype(0)), [dtype(-0.0), dtype(0.5), dtype(-0.5)]]).astype(dtype)
    inv = np.array([2.0, 0.5, 1.0, 4.0], dtype=dtype)  # per channel along the last axis
    v = v[:v.size // 4 * 4].reshape(-1, 4) / inv
    for rule, mode in ROUNDING.items():
        spec = QuantSpec(61, rounding=rule)  # codes -30..30: the wide values saturate
        lo, hi = spec.code_grid.bounds(np.dtype(dtype))
        frozen = FrozenQuant.of(spec, inv, None, "x", np.dtype(dtype), False)
        got = frozen.apply(v.copy())
        want = np.array([[min(max(round_code(x * s, mode), lo), hi) / s for x, s in zip(row, inv)] for row in v],
                        dtype=dtype)
        assert got.dtype == dtype and np.array_equal(got, want), rule
        assert (np.abs(got * inv) == 30).any()


def test_layers_and_models_are_freed_without_the_cycle_collector():
    # no part of a layer refers back to it: a dropped model (and its forward caches, e.g. in a PTQ
    # sweep) is freed at once, not at the next cyclic collection
    enabled = gc.isenabled()
    gc.disable()
    try:
        for quant in (None, QuantConfig(16)):
            model = S4DModel(1, 3, d_model=4, d_state=4, n_layers=2, quant=quant, seed=0)
            model.forward(np.zeros((2, 5, 1), np.float32), training=True)
            ref = weakref.ref(model)
            del model
            assert ref() is None
    finally:
        if enabled:
            gc.enable()
    layer = S4D(4, 8, quant=QuantConfig(16), seed=0)
    twin = copy.deepcopy(layer)  # the copy's quantizers are the copy's own children
    assert twin.q["C"] is twin.core.children()["quant_C"] and twin.q["C"] is not layer.q["C"]
    assert twin.q["act"] is twin.children()["quant_act"]
