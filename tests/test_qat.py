"""Quantization-aware S4D / S4DModel: STE gradients, the float limit, mode agreement, files, bad input.

STE gradients are checked against finite differences of a *frozen-offset* model:
every ``Quantizer`` is replaced by x -> x + (q(x0) - x0) with the offset recorded at
the checked point x0 (``frozen_quantizers``). That model equals the quantized one at
x0 and its exact derivative passes each quantizer as the identity, which is what the
identity straight-through estimator claims; everything else (discretization, kernel,
convolution, scan, mixing, norms) is differentiated for real. The quantized-state scan
is replaced by the LSQ surrogate of ``reference/quant.py`` the same way.
"""
from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest

import qs4d_np.ssm.core as core_module
from qs4d_np.core.loss import SoftmaxCrossEntropy
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant import QuantConfig, Quantizer
from qs4d_np.ssm.s4d import S4D
from reference.gradcheck import grad_error, numerical_grad
from reference.quant import quant_scan_ref

TINY = dict(d_model=3, d_state=4, n_layers=1, dropout=0.0, dtype=np.float64, seed=3)
TOL = 1e-6
# Same balance of truncation and rounding error as tests/test_model.py (measured there).
FD_EPS = 3e-5


@contextlib.contextmanager
def frozen_quantizers(model, monkeypatch=None, current_state_inv=False):
    """Record every quantizer's offset q(x) - x on the first forward, then apply only the offsets.

    With ``monkeypatch`` the quantized-state scan is frozen too: the first forward records
    each layer's state inv, later forwards run reference.quant_scan_ref's surrogate (with the
    forward's current inv instead when ``current_state_inv``: a learned step then moves it).
    """
    quantizers = [m for _, m in model.modules() if isinstance(m, Quantizer)]
    offsets: dict[int, np.ndarray] = {}
    originals = {id(q): q.forward for q in quantizers}

    def wrap(q):
        def forward(x, training=False):
            if id(q) not in offsets:
                out = originals[id(q)](x, training=training)
                offsets[id(q)] = out - x
                return out
            return x + offsets[id(q)]
        return forward

    for q in quantizers:
        q.forward = wrap(q)
    if monkeypatch is not None:
        real_scan = core_module.quant_scan
        recorded: list = []
        calls = itertools.count()

        def scan(u, Abar, Bbar, C, D, state, clip):
            i = next(calls) % max(len(recorded), 1) if len(recorded) == n_layers() else None
            if i is None:
                y, cache = real_scan(u, Abar, Bbar, C, D, state, clip)
                recorded.append((state, {}))
                return y, cache
            st, frozen = recorded[i]
            if current_state_inv:
                st = state
            g = st.spec.code_grid
            inv = st.per_channel_inv(Abar.shape[0], np.dtype(np.float64))
            return quant_scan_ref(u, Abar, Bbar, C, D, inv, g.qmin, g.qmax, clip=clip, frozen=frozen), None

        def n_layers():
            return sum(isinstance(m, S4D) and m.q["x"] is not None for _, m in model.modules())

        monkeypatch.setattr(core_module, "quant_scan", scan)
    try:
        yield
    finally:
        for q in quantizers:
            del q.forward


def check_ste_grads(model, x, mode, monkeypatch=None, state_steps=False):
    """FD of the frozen-offset model vs the analytic STE gradients of L = sum(logits * R).

    ``state_steps``: also check the learned state steps (``quant_x.step``) against FD of the
    surrogate scan, whose inv follows the step (the analytic ones carry LSQ's gradient scale).
    """
    R = np.random.default_rng(99).standard_normal((x.shape[0], model.d_output))
    with frozen_quantizers(model, monkeypatch, current_state_inv=state_steps):
        model.forward(x, mode=mode)
        model.backward(R.copy())
        analytic = {k: v.copy() for k, v in model.grads.items()}
        model.forward(x, mode=mode)  # the surrogate scan records its residuals at this point
        loss = lambda: float(np.sum(model.forward(x, mode=mode) * R))  # noqa: E731
        checked = 0
        for name, p in model.params.items():
            if state_steps and name.endswith("quant_x.step"):
                q = dict(model.modules())[name[:-len(".step")]]
                count = 2 * x.shape[0] * x.shape[1] * model.blocks[0].ssm.d_model * (model.blocks[0].ssm.d_state // 2)
                scale = 1.0 / np.sqrt(count / q.n_scales * q.spec.code_grid.qpos)
                # eps relative to the step (~1e-2): 1e-7 of it left FD rounding noise at ~6e-6 of the
                # gradient, 1e-5 of it pushed a code across the surrogate's saturation kink; 1e-6 passes TOL
                num = numerical_grad(loss, p, eps=1e-6 * float(np.max(p)))
                assert grad_error(analytic[name], num * scale) <= TOL, (name, analytic[name], num * scale)
                checked += 1
                continue
            if name.endswith(".step"):
                continue  # LSQ steps: the frozen offsets do not depend on them (tested in test_quant_quantizer)
            num = numerical_grad(loss, p, eps=FD_EPS)
            if np.max(np.abs(num)) < 1e-9:
                assert np.max(np.abs(analytic[name])) < 1e-9, name
                continue
            assert grad_error(analytic[name], num) <= TOL, (name, grad_error(analytic[name], num))
            checked += 1
    assert checked >= 6


def jittered(model, seed=5):
    """Perturb the SSM parameters so that the init's exact grid values (e.g. Re(A) = -1/2 everywhere)
    do not make a quantizer lossless."""
    rng = np.random.default_rng(seed)
    for name, p in model.params.items():
        if name.split(".")[-1] in ("log_A_real", "A_imag", "log_dt", "Abar_rho", "Abar_theta"):
            p += 0.1 * rng.standard_normal(p.shape)
    return model


def data(B=2, L=6, d_in=2, seed=0):
    return np.random.default_rng(seed).standard_normal((B, L, d_in))


CONV_TARGETS = ["A", "C", "dt", "state", "linear", "act", "coder", "all"]


@pytest.mark.parametrize("target", CONV_TARGETS)
def test_conv_mode_ste_gradients_match_fd_of_the_frozen_offset_model(target):
    quant = QuantConfig(**{target: 16})
    model = jittered(S4DModel(2, 3, quant=quant, **TINY))
    quantized = [n for n, m in model.modules() if isinstance(m, Quantizer)]
    assert quantized  # the target really put a quantizer in
    x = data()
    # The quantizers change the output: the test is not checking a float model.
    float_model = jittered(S4DModel(2, 3, **TINY))
    assert not np.allclose(model.forward(x), float_model.forward(x), atol=1e-9)
    check_ste_grads(model, x, "conv")


@pytest.mark.parametrize("abar", ["discrete", "frozen"])
@pytest.mark.parametrize("mode", ["conv", "recurrent"])
def test_abar_parameterizations_ste_gradients(abar, mode):
    quant = QuantConfig(all=32, state="float")
    model = jittered(S4DModel(2, 3, quant=quant, abar=abar, **TINY))
    check_ste_grads(model, data(), mode)


@pytest.mark.parametrize("target", ["A", "B", "C", "D", "dt", "linear", "act", "coder"])
def test_recurrent_mode_ste_gradients_match_fd(target):
    model = jittered(S4DModel(2, 3, quant=QuantConfig(**{target: 16}), **TINY))
    check_ste_grads(model, data(), "recurrent")


@pytest.mark.parametrize("scale_mode", ["absmax", "fixed"])
def test_recurrent_state_quantization_gradients_match_fd_of_the_surrogate(monkeypatch, scale_mode):
    # clipped STE: the surrogate's saturation edges have zero slope, the clipped STE's rule
    state = {"ste": "clipped", "scale_mode": scale_mode}
    if scale_mode == "fixed":
        state["fixed_range"] = 0.3  # small: some states saturate
    quant = QuantConfig(state=64, C=16, target_options={"state": state})
    model = jittered(S4DModel(2, 3, quant=quant, state_clip=5.0, **{**TINY, "n_layers": 2}))
    check_ste_grads(model, data(), "recurrent", monkeypatch)


@pytest.mark.parametrize("per_channel", [False, True])
def test_learned_state_step_gradient_matches_fd_of_the_surrogate(monkeypatch, per_channel):
    # clipped STE: the learned range starts at the float states' absmax, which quantized states can pass
    quant = QuantConfig(state=64, per_channel=per_channel,
                        target_options={"state": {"scale_mode": "learned", "ste": "clipped"}})
    model = jittered(S4DModel(2, 3, quant=quant, **TINY))
    check_ste_grads(model, data(), "recurrent", monkeypatch, state_steps=True)


@pytest.mark.parametrize("mode", ["conv", "recurrent"])
def test_fine_quantization_matches_the_float_model(mode):
    # 2**30 states: every quantization error is ~1e-9 of its range, far below the tolerance
    quant = QuantConfig(all=2**30)
    q_model = S4DModel(2, 3, quant=quant, **{**TINY, "n_layers": 2, "d_model": 4})
    f_model = S4DModel(2, 3, **{**TINY, "n_layers": 2, "d_model": 4})
    x, labels = data(B=3, L=8), np.array([0, 2, 1])
    results = []
    for model in (q_model, f_model):
        loss_fn = SoftmaxCrossEntropy()
        loss = loss_fn.forward(model.forward(x, mode=mode), labels)
        model.backward(loss_fn.backward())
        results.append((loss, model.grads))
    (lq, gq), (lf, gf) = results
    assert abs(lq - lf) <= TOL * abs(lf)
    for name, g in gf.items():
        assert grad_error(gq[name], g) <= TOL, name
    assert abs(lq - lf) > 0  # the quantizers did run


def test_conv_and_recurrent_qat_agree_without_state_quantization():
    # Targets with the same place in both modes (A and B/D differ by design: A before vs Abar after
    # discretization; B, D only in recurrent mode).
    quant = QuantConfig(C=8, dt=8, linear=8, act=16, coder=8)
    model = S4DModel(2, 3, quant=quant, **{**TINY, "n_layers": 2})
    x = data(L=10)
    R = np.random.default_rng(1).standard_normal((2, 3))
    outs, grads = [], []
    for mode in ("conv", "recurrent"):
        outs.append(model.forward(x, mode=mode))
        model.backward(R)
        grads.append({k: v.copy() for k, v in model.grads.items()})
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    for name in grads[0]:
        assert grad_error(grads[0][name], grads[1][name]) <= 1e-9, name


def test_discrete_and_frozen_modes_agree_across_modes():
    quant = QuantConfig(A=16, C=16)
    for abar in ("discrete", "frozen"):
        model = S4DModel(2, 3, quant=quant, abar=abar, **TINY)
        x = data(L=9)
        np.testing.assert_allclose(model.forward(x, mode="conv"), model.forward(x, mode="recurrent"),
                                   rtol=1e-10, atol=1e-12)


def test_save_load_round_trip_keeps_steps_and_running_ranges(tmp_path):
    quant = QuantConfig(all=16, per_channel=True, target_options={
        "act": {"scale_mode": "running"}, "state": {"scale_mode": "running"}, "C": {"scale_mode": "learned"}})
    model = jittered(S4DModel(2, 3, quant=quant, abar="frozen", state_clip=4.0, **{**TINY, "n_layers": 2}))
    x = data()
    for mode in ("conv", "recurrent"):
        model.forward(x, training=True, mode=mode)  # calibrates the running ranges of both modes
    buffers = model.named_buffers()
    assert any(k.endswith("quant_act.running_lo") for k in buffers)
    assert any(k.endswith("quant_x.running_hi") for k in buffers)
    assert any(k.endswith("ssm.Abar") for k in buffers)  # the frozen Abar
    assert any(k.endswith("quant_C.step") for k in model.params)
    model.save(tmp_path / "m")
    loaded = S4DModel.load(tmp_path / "m")
    assert loaded.quant == quant and loaded.config["abar"] == "frozen"
    assert loaded.config["quant"] == quant.to_dict()
    for k, v in model.params.items():
        assert np.array_equal(loaded.params[k], v), k
    for k, v in buffers.items():
        assert np.array_equal(loaded.named_buffers()[k], v), k
    for mode in ("conv", "recurrent"):
        assert np.array_equal(loaded.forward(x, mode=mode), model.forward(x, mode=mode))


def test_running_quantizers_need_calibration_and_then_ignore_the_batch():
    quant = QuantConfig(act=16, target_options={"act": {"scale_mode": "running"}})
    model = S4DModel(2, 3, quant=quant, **TINY)
    x = data(B=4)
    with pytest.raises(RuntimeError, match="no calibrated range"):
        model.forward(x)
    model.forward(x, training=True)
    # frozen in eval: one sequence gives the same logits alone as inside the batch
    np.testing.assert_allclose(model.forward(x[:1])[0], model.forward(x)[0], rtol=1e-12)


def test_discrete_abar_stays_inside_the_unit_circle_after_updates():
    from qs4d_np.train.optim import AdamW
    model = S4DModel(2, 3, quant=QuantConfig(A=64), abar="discrete", **TINY)
    ssm = model.blocks[0].ssm
    assert {"Abar_rho", "Abar_theta", "Bbar"} <= set(ssm.params) and "log_A_real" not in ssm.params
    opt = AdamW(model.params, lr=0.5, weight_decay=0.0)
    x = data()
    for _ in range(20):  # large steps, always towards larger |Abar| (smaller rho)
        model.forward(x)
        model.backward(np.ones((2, 3)))
        g = dict(model.grads)
        g["layers.0.ssm.Abar_rho"] = np.ones_like(g["layers.0.ssm.Abar_rho"])
        opt.step(g)
    Abar = ssm.discrete().Abar
    assert np.abs(Abar).max() < 1.0
    assert np.abs(Abar).max() > 0.999  # the updates really pushed it to the circle


def test_frozen_abar_has_no_gradient_and_no_A_parameters():
    model = jittered(S4DModel(2, 3, quant=QuantConfig(A=8, C=8), abar="frozen", **TINY))
    ssm = model.blocks[0].ssm
    assert not {"log_dt", "log_A_real", "A_imag", "Abar_rho", "Abar_theta"} & set(ssm.params)
    Abar0 = ssm.core.buffers["Abar"].copy()
    for mode in ("conv", "recurrent"):
        model.forward(data(), training=True, mode=mode)
        model.backward(np.ones((2, 3)))
        assert set(model.grads) == set(model.params)
    assert np.array_equal(ssm.core.buffers["Abar"], Abar0)
    # it runs at its quantized value
    q = ssm.q["Abar"]
    np.testing.assert_array_equal(q.forward(ssm.discrete().Abar), q.forward(Abar0.astype(np.complex128)))


def test_model_config_and_quant_attribute():
    quant = QuantConfig(all=32, state=64)
    model = S4DModel(2, 3, quant=quant, abar="discrete", **TINY)
    assert model.quant is quant and model.config["quant"] == quant.to_dict() and model.config["abar"] == "discrete"
    plain = S4DModel(2, 3, **TINY)
    assert plain.quant is None and plain.config["quant"] is None and plain.config["abar"] == "continuous"
    assert not [m for _, m in plain.modules() if isinstance(m, Quantizer)]
    names = {n.split(".")[-1] for n, m in model.modules() if isinstance(m, Quantizer)}
    assert names == {"quant_Abar", "quant_B", "quant_C", "quant_D", "quant_K", "quant_u", "quant_x",
                     "quant_linear", "quant_act", "quant_encoder", "quant_decoder"}
    # the conv-mode state gets levels // 2 states, the recurrent state the full count
    ssm = model.blocks[0].ssm
    assert ssm.q["K"].spec.levels == 32 and ssm.q["u"].spec.levels == 32 and ssm.q["x"].spec.levels == 64
    # ... but never fewer states than the grid needs for a nonzero code
    for grid, levels, halved in (("narrow", 4, 3), ("narrow", 8, 4), ("qs4d", 2, 2), ("qs4d", 4, 2), ("full", 3, 2)):
        ssm = S4D(3, 4, quant=QuantConfig(state=levels, grid=grid))
        assert ssm.q["K"].spec.levels == halved and ssm.q["x"].spec.levels == levels, (grid, levels)


def test_bad_input():
    with pytest.raises(TypeError, match="quant must be a QuantConfig"):
        S4DModel(2, 3, quant={"all": 8}, **TINY)
    with pytest.raises(TypeError, match="quant must be a QuantConfig"):
        S4D(3, 4, quant=8)
    with pytest.raises(ValueError, match="abar must be one of"):
        S4DModel(2, 3, abar="learned", **TINY)
    with pytest.raises(ValueError, match="abar must be one of"):
        S4D(3, 4, abar="polar")
    with pytest.raises(ValueError, match="unknown quantization target"):
        QuantConfig(mixing=8)
    with pytest.raises(ValueError, match="learn_B applies to abar='continuous'"):
        S4D(3, 4, abar="discrete", learn_B=True)
    with pytest.raises(ValueError, match="layer must be >= 0"):
        S4D(3, 4, layer=-1)
    with pytest.raises(ValueError, match="state_clip must be > 0"):
        S4D(3, 4, state_clip=0.0)
    with pytest.raises(ValueError, match=r"step\(\): quantizer 'x' \(target 'state', scale_mode='absmax'\) "
                                         r"takes its range from the whole sequence"):
        m = S4D(3, 4, quant=QuantConfig(C=8, state=16))  # streaming a quantized layer needs static ranges
        m.step(np.zeros((1, 3)), m.initial_state(1))
    model = S4DModel(2, 3, quant=QuantConfig(state=16, target_options={"state": {"scale_mode": "absmean"}}), **TINY)
    model.forward(data(), mode="conv")  # absmean is fine for K and u
    with pytest.raises(ValueError, match="absmean' has no recurrent-mode meaning"):
        model.forward(data(), mode="recurrent")
    with pytest.raises(ValueError, match="x contains 1 non-finite"):
        x = data()
        x[0, 1, 0] = np.nan
        S4DModel(2, 3, quant=QuantConfig(all=8), **TINY).forward(x)


def calibrated_layer(abar="continuous", per_channel=True, seed=4):
    """A float64 S4D layer (SSM core only) with every recurrent target quantized and static ranges."""
    quant = QuantConfig(A=64, B=16, C=16, D=16, dt=32, state=256, act=64, per_channel=per_channel,
                        target_options={"state": {"scale_mode": "running", "power_of_two": True},
                                        "act": {"scale_mode": "running"}})
    layer = S4D(3, 6, activation=None, mixing=None, dtype=np.float64, seed=seed, quant=quant, layer=0,
                abar=abar, state_clip=8.0)
    jittered(layer)
    u = np.random.default_rng(seed).standard_normal((2, 12, 3))
    layer.forward(u, training=True, mode="recurrent")  # calibrates the state and act ranges
    return layer, u


@pytest.mark.parametrize("abar", ["continuous", "discrete", "frozen"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantized_recurrent_exports_exactly_what_the_forward_uses(monkeypatch, abar, per_channel):
    layer, u = calibrated_layer(abar, per_channel)
    seen = {}
    real = core_module.quant_scan

    def spy(u, Abar, Bbar, C, D, state, clip):
        seen.update(Abar=Abar, Bbar=Bbar, C=C, D=D, state=state, clip=clip)
        return real(u, Abar, Bbar, C, D, state, clip)

    monkeypatch.setattr(core_module, "quant_scan", spy)
    y = layer.forward(u, mode="recurrent")
    ex = layer.quantized_recurrent()
    for key in ("Abar", "Bbar", "C", "D"):
        t = ex[key]
        assert t.q.dtype == np.int64 and np.all(t.q >= t.grid.qmin) and np.all(t.q <= t.grid.qmax), key
        assert np.array_equal(t.dequantize(), seen[key]), key
    assert ex["Abar"].q.shape == (2, 3, 3) and ex["D"].q.shape == (3,)
    assert np.array_equal(np.broadcast_to(ex["state"].per_channel_inv(3, np.dtype(np.float64)), (3, 2)),
                          seen["state"].per_channel_inv(3, np.dtype(np.float64)))
    assert ex["clip"] == seen["clip"] == 8.0
    # the integer golden model's contract: the act scales reproduce the layer's output grid
    act = ex["act"]
    codes = np.rint(y * act["inv_scale"]) + act["zero_point"]
    assert np.array_equal(codes / act["inv_scale"], y)


@pytest.mark.parametrize("abar", ["continuous", "frozen"])
def test_recurrent_quantized_layer_matches_its_reference_twin_exactly(abar):
    from reference.quant import fake_quant_ref

    layer, u = calibrated_layer(abar)
    ex = layer.quantized_recurrent()
    y = layer.forward(u, mode="recurrent")
    d = layer.discrete()  # float Abar, Bbar (the dt quantizer only moves the continuous ones)
    p = layer.params
    if abar == "continuous":
        log_dt_q = fake_quant_ref(p["log_dt"], 32, axis=None)[0]  # dt, D: per tensor even per channel
        from qs4d_np.ssm.discretize import discretize
        d = discretize(log_dt_q, p["log_A_real"], p["A_imag"], None, "zoh")
    Abar = fake_quant_ref(d.Abar, 64, axis=0)[0]
    Bbar = fake_quant_ref(d.Bbar, 16, axis=0)[0]
    C = fake_quant_ref(p["C"], 16, axis=0, complex_mode="shared")[0]
    D = fake_quant_ref(p["D"], 16, axis=None)[0]
    for name, ref in (("Abar", Abar), ("Bbar", Bbar), ("C", C), ("D", D)):
        assert np.array_equal(ex[name].dequantize(), ref), name
    st = ex["state"]
    g = st.spec.code_grid
    inv = st.per_channel_inv(3, np.dtype(np.float64))
    assert np.all(np.log2(inv) == np.round(np.log2(inv)))  # power-of-two state scales
    y_ref = quant_scan_ref(u, Abar, Bbar, C, D, inv, g.qmin, g.qmax, clip=8.0)
    # the act quantizer (running range) on top, from its exported scales
    act = ex["act"]
    y_ref = np.clip(np.rint(y_ref * act["inv_scale"]), act["grid"].qmin, act["grid"].qmax) / act["inv_scale"]
    assert np.array_equal(y, y_ref)


def test_quantized_recurrent_needs_static_ranges():
    with pytest.raises(ValueError, match="needs a layer built with quant"):
        S4D(3, 4).quantized_recurrent()
    layer = S4D(3, 4, quant=QuantConfig(state=64, C=8))  # state absmax: batch dependent
    with pytest.raises(ValueError, match="takes its range from each tensor"):
        layer.quantized_recurrent()
    layer = S4D(3, 4, quant=QuantConfig(state=64, target_options={"state": {"scale_mode": "running"}}))
    with pytest.raises(RuntimeError, match="no calibrated range"):
        layer.quantized_recurrent()


@pytest.mark.parametrize("train_mode, other_mode, never_run", [
    ("conv", "recurrent", ["quant_x"]), ("recurrent", "conv", ["quant_K", "quant_u"])])
def test_learned_act_and_state_steps_a_mode_never_ran_can_be_saved_and_resumed(tmp_path, train_mode,
                                                                                other_mode, never_run):
    # Conv training never reaches quant_x (the state), recurrent training never reaches the
    # conv path's activation quantizers: their learned steps stay uninitialised, which must be
    # saveable (the trainer refuses NaN parameters) and must still initialise after a load.
    from qs4d_np.train.optim import AdamW
    quant = QuantConfig(all=16, target_options={"act": {"scale_mode": "learned"},
                                                "state": {"scale_mode": "learned"}})
    model = jittered(S4DModel(2, 3, quant=quant, **TINY))
    learned = {name: q for name, q in model.modules() if isinstance(q, Quantizer) and q.scale_mode == "learned"}
    x, labels = data(B=3), np.array([0, 2, 1])
    loss = SoftmaxCrossEntropy()
    opt = AdamW(model.params, lr=1e-2, weight_decay=0.0)
    loss.forward(model.forward(x, training=True, mode=train_mode), labels)
    model.backward(loss.backward())  # no zero_grads, as in the trainer: every step needs a gradient
    assert all(not model.grads[f"{name}.step"].any() for name, q in learned.items() if not q.step_ready)
    opt.step(model.grads)
    unset = sorted(name for name, q in learned.items() if not q.step_ready)
    assert [name.rsplit(".", 1)[1] for name in unset] == never_run
    assert all(np.isfinite(v).all() for v in model.params.values())  # what the trainer requires
    model.save(tmp_path / "m")
    loaded = S4DModel.load(tmp_path / "m")
    for k, v in model.state_arrays().items():
        assert np.array_equal(loaded.state_arrays()[k], v), k
    loaded_learned = {name: q for name, q in loaded.modules() if isinstance(q, Quantizer) and q.scale_mode == "learned"}
    assert sorted(name for name, q in loaded_learned.items() if not q.step_ready) == unset
    # the other mode after the load initialises those steps from the data, exactly as without the file
    out = loaded.forward(x, mode=other_mode)
    assert np.array_equal(out, model.forward(x, mode=other_mode)) and np.isfinite(out).all()
    assert all(loaded_learned[name].step_ready for name in unset)
    for name in unset:
        assert np.array_equal(loaded_learned[name].params["step"], learned[name].params["step"]), name


@pytest.mark.parametrize("abar", ["continuous", "discrete"])
def test_abar_bound_keeps_the_recurrent_adjoint_bounded_at_4_bits(abar):
    # 4-bit Cartesian rounding pushes some |Abar_q| above 1 (measured: up to 1.05 for this layer),
    # and the BPTT adjoint then grows like |Abar_q|**L. With every |Abar_q| <= 1, and the identity STE
    # and no clip (masks <= 1), the core's input gradient for dL/dy = 1 is bounded by
    # |D| + 2 * sum_n |C_n| |Bbar_n| * (L - t) <= |D| + 2 * L * sum_n |C_n| |Bbar_n| per channel.
    u = np.random.default_rng(0).standard_normal((2, 784, 4)).astype(np.float32)

    def grad_and_bound(abar_bound):
        layer = S4D(4, 64, quant=QuantConfig(all=16, per_channel=True, abar_bound=abar_bound), abar=abar,
                    activation=None, mixing=None, seed=0)
        e = layer.effective_ssm()
        y = layer.forward(u, training=True, mode="recurrent")
        du = layer.backward(np.ones_like(y))
        bound = np.abs(e.D) + 2 * u.shape[1] * np.sum(np.abs(e.C) * np.abs(e.Bbar), axis=1)
        return np.abs(e.Abar).max(), np.abs(du).max(axis=(0, 1)), bound

    modulus, du, bound = grad_and_bound(True)
    assert modulus <= 1.0 and np.all(du <= bound * (1 + 1e-4))  # 1e-4: float32 sums over 784 steps
    modulus, du, bound = grad_and_bound(False)  # the unbounded rounding leaves the disk and the bound fails
    assert modulus > 1.0 and np.any(du > bound)


def _running_state_layer(per_channel, complex_mode, clip):
    quant = QuantConfig(state=16, per_channel=per_channel,
                        target_options={"state": {"scale_mode": "running", "complex_mode": complex_mode}})
    return S4D(3, 6, quant=quant, activation=None, mixing=None, dropout=0.0, dtype=np.float64, seed=1,
               state_clip=clip)


def _scale_order(absmax, per_channel, complex_mode):
    """(H, 2) maxima -> the state quantizer's scales, written out per layout."""
    if complex_mode == "cartesian":
        return absmax.T.reshape(-1) if per_channel else absmax.max(axis=0)
    return absmax.max(axis=1) if per_channel else absmax.max(keepdims=True).reshape(1)


@pytest.mark.parametrize("per_channel, complex_mode, clip", [
    (True, "cartesian", None), (False, "cartesian", 0.7), (True, "shared", 0.7), (False, "shared", None)])
def test_running_state_range_follows_the_quantized_scan_with_one_batch_of_lag(monkeypatch, per_channel,
                                                                            complex_mode, clip):
    import qs4d_np.quant.state as state_module

    layer = _running_state_layer(per_channel, complex_mode, clip)
    calls = []
    real_absmax = state_module.state_absmax
    monkeypatch.setattr(state_module, "state_absmax", lambda *a, **k: calls.append(1) or real_absmax(*a, **k))
    q = layer.q["x"]
    e = layer.effective_ssm()  # only the state is quantized: Abar, Bbar, C, D are the float ones
    H, clip_v = 3, np.inf if clip is None else clip
    g = q.spec.code_grid
    batches = [np.random.default_rng(s).standard_normal((2, 9, H)) * 3 for s in range(3)]
    # batch 1: no buffers yet, so the range comes from this batch's float states (one float pass)
    layer.forward(batches[0], training=True, mode="recurrent")
    assert len(calls) == 1
    _, float_max = quant_scan_ref(batches[0], e.Abar, e.Bbar, e.C, e.D, np.ones((H, 2)), -1, 1, clip=clip_v,
                                  quantize=False, return_absmax=True)
    hi = _scale_order(float_max, per_channel, complex_mode)
    assert np.array_equal(q.buffers["running_hi"], hi) and np.array_equal(q.buffers["running_lo"], -hi)
    for u in batches[1:]:
        # later batches: quantized with the buffers from before them, then the scan's own max |w| folded in
        inv = q.scan_scales(None, e.Abar, e.Bbar, clip_v).per_channel_inv(H, np.float64)
        y_want, wmax = quant_scan_ref(u, e.Abar, e.Bbar, e.C, e.D, inv, g.qmin, g.qmax, clip=clip_v,
                                      return_wmax=True)
        y = layer.forward(u, training=True, mode="recurrent")
        assert np.array_equal(y, y_want)
        hi = (1 - q.momentum) * hi + q.momentum * _scale_order(wmax, per_channel, complex_mode)
        assert np.array_equal(q.buffers["running_hi"], hi) and np.array_equal(q.buffers["running_lo"], -hi)
    assert len(calls) == 1  # no float-state pass after the first batch
    layer.backward(np.ones_like(y))  # the backward runs on the observed forward's cache
    # evaluation: the buffers are frozen and no pass runs
    before = q.buffers["running_hi"].copy()
    layer.forward(batches[0], mode="recurrent")
    assert np.array_equal(q.buffers["running_hi"], before) and len(calls) == 1


def test_calibrate_keeps_the_float_state_range_and_training_then_observes_the_scan(monkeypatch):
    import qs4d_np.quant.state as state_module
    from qs4d_np.train.ptq import calibrate

    quant = QuantConfig(state=16, per_channel=True, target_options={"state": {"scale_mode": "running"}})
    model = jittered(S4DModel(2, 3, quant=quant, **{**TINY, "n_layers": 1}))
    ssm = model.blocks[0].ssm
    calls = []
    real_absmax = state_module.state_absmax
    monkeypatch.setattr(state_module, "state_absmax", lambda *a, **k: calls.append(1) or real_absmax(*a, **k))
    xs = [data(seed=s) for s in range(2)]
    inputs = []  # the SSM core's input, recorded for the twin
    real_forward = ssm.core.forward
    monkeypatch.setattr(ssm.core, "forward", lambda u, *a, **k: inputs.append(u.copy()) or real_forward(u, *a, **k))
    calibrate(model, xs, mode="recurrent")
    assert len(calls) == 2  # calibration: every batch's float states
    e = ssm.effective_ssm()
    q = ssm.q["x"]
    hi = None
    for u in inputs:
        _, m = quant_scan_ref(u, e.Abar, e.Bbar, e.C, e.D, np.ones((3, 2)), -1, 1, quantize=False,
                              return_absmax=True)
        m = m.T.reshape(-1)
        hi = m if hi is None else (1 - q.momentum) * hi + q.momentum * m
    np.testing.assert_array_equal(q.buffers["running_hi"], hi)
    model.forward(xs[0], training=True, mode="recurrent")  # calibrated: the scan observes itself
    assert len(calls) == 2 and not np.array_equal(q.buffers["running_hi"], hi)


def test_recurrent_mode_names_the_fix_for_an_asymmetric_state():
    x = np.random.default_rng(0).standard_normal((2, 8, 2))
    model = S4DModel(2, 3, quant=QuantConfig(16, symmetric=False), **TINY)
    model.forward(x, training=True, mode="conv")  # conv mode's K and u may be asymmetric
    with pytest.raises(ValueError, match=r"symmetric=False; set target_options=\{'state': \{'symmetric': True\}\}"):
        model.forward(x, training=True, mode="recurrent")
    fixed = S4DModel(2, 3, quant=QuantConfig(16, symmetric=False, target_options={"state": {"symmetric": True}}),
                     **TINY)
    assert np.isfinite(fixed.forward(x, training=True, mode="recurrent")).all()
