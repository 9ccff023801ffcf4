"""Transient noise on the values a forward computes with (hardware.noise, the core.perturb hook).

Where, how much, how often, the straight-through backward, exact restore, bad input.
"""
import numpy as np
import pytest

from qs4d_np.core.linear import Linear
from qs4d_np.hardware import CrossbarConfig, to_analog
from qs4d_np.hardware.noise import GaussianSource, noise_sites, transient_noise
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.config import QuantConfig
from qs4d_np.ssm.discretize import continuous_A
from reference.gradcheck import grad_error, numerical_grad

TINY = dict(d_model=8, d_state=8, n_layers=2, dropout=0.0)
ALL = ("A", "B", "C", "D", "dt", "linear", "coder")
MODES = ("conv", "recurrent")


def _model(seed=0, **kw):
    model = S4DModel(2, 3, seed=seed, **{**TINY, **kw})
    rng = np.random.default_rng(seed + 100)
    for name, value in model.params.items():  # spread Re(A): at init it is one value (range 0)
        if name.endswith("log_A_real"):
            value += (0.5 * rng.standard_normal(value.shape)).astype(value.dtype)
    return model


def _x(n=3, length=12, seed=1):
    return np.random.default_rng(seed).standard_normal((n, length, 2)).astype(np.float32)


def _bits(model):
    return {k: v.copy() for k, v in {**model.params, **model.named_buffers()}.items()}


def _assert_bits(model, snap):
    now = {**model.params, **model.named_buffers()}
    assert now.keys() == snap.keys()
    for k, v in now.items():
        assert v.dtype == snap[k].dtype and np.array_equal(v.view(np.uint8), snap[k].view(np.uint8)), k


QUANTS = {"float": None, "qat16": QuantConfig(16), "A4": QuantConfig(A=4)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("quant", list(QUANTS))
def test_sigma_zero_is_the_clean_forward_and_draws_nothing(mode, quant):
    model = _model(quant=QUANTS[quant], mode=mode)
    x = _x()
    clean = model.forward(x)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    with transient_noise(model, 0.0, rng, targets=ALL) as block:
        np.testing.assert_array_equal(model.forward(x), clean)
        np.testing.assert_array_equal(model.forward(x, training=True), model.forward(x, training=True))
    assert block.draws == 0 and rng.bit_generator.state == state


@pytest.mark.parametrize("mode", MODES)
def test_noise_sits_after_the_quantizer(mode):
    # A (conv) / Abar (recurrent) on 4 states of a fixed range: noise of 1e-3 of the range added before
    # the quantizer rounds back to the same codes (shown at the end in conv mode on the float parameters,
    # the old protocol; in recurrent mode the float Bbar would move with A); added after it, every
    # forward changes the output
    fixed = {"scale_mode": "fixed", "fixed_range": 4.0 if mode == "conv" else 1.0}
    model = _model(quant=QuantConfig(A=4, target_options={"A": fixed}), mode=mode)
    x = _x()
    clean = model.forward(x)
    outputs = []
    # the 4-state Abar of decaying modes holds one code per part: its range is 0, so the qs4d protocol
    # would draw zero-std noise there (as the reference would); absmax scales by the code itself
    protocol = "qs4d" if mode == "conv" else "absmax"
    with transient_noise(model, 1e-3, np.random.default_rng(3), protocol):
        for _ in range(4):
            outputs.append(model.forward(x))
            assert not np.array_equal(outputs[-1], clean)
    for a, b in zip(outputs, outputs[1:]):
        assert not np.array_equal(a, b)  # redrawn at every forward
    if mode == "recurrent":
        return
    rng = np.random.default_rng(3)
    snap = _bits(model)
    for name, value in model.params.items():
        if name.endswith(("log_A_real", "A_imag")):
            A = value.astype(np.float64)
            value[...] = A + 1e-3 * (A.max() - A.min()) * rng.standard_normal(A.shape)
    np.testing.assert_array_equal(model.forward(x), clean)
    for name, value in model.params.items():
        value[...] = snap[name]


class Recorder:
    """A value perturbation that records what the forward hands it and adds nothing."""

    def __init__(self):
        self.seen = []

    def wants(self, key):
        return True

    def perturb(self, key, value):
        self.seen.append((key, value.copy()))
        return value.copy()


@pytest.mark.parametrize("quant", ["float", "qat16"])
@pytest.mark.parametrize("mode", MODES)
def test_the_hook_sees_the_quantized_values_in_the_documented_order(mode, quant):
    model = _model(quant=QUANTS[quant], mode=mode, n_layers=1)
    layer = model.blocks[0].ssm
    core, linear = layer.core, layer.mixing.linear
    ops = {"encoder": model.encoder, "core": core, "linear": linear, "decoder": model.decoder}
    recorders = {name: Recorder() for name in ops}
    for name, op in ops.items():
        op.perturbation = recorders[name]
    try:
        model.forward(_x())
    finally:
        for op in ops.values():
            op.perturbation = None
    keys = [k for k, _ in recorders["core"].seen]
    assert keys == (["dt", "A", "C", "B", "D"] if mode == "conv" else ["dt", "Abar", "C", "B", "D"])
    seen = dict(recorders["core"].seen)
    eff = layer.effective_ssm(mode)
    A = continuous_A(core.params["log_A_real"], core.params["A_imag"])
    if mode == "recurrent":  # Abar after its quantizer, not the float Abar
        np.testing.assert_array_equal(seen["Abar"], eff.Abar)
        assert quant == "float" or not np.array_equal(seen["Abar"], eff.Abar_float)
    elif quant == "float":  # the float A, formed explicitly
        np.testing.assert_array_equal(seen["A"], A)
    else:  # A after the A quantizer
        with core.q["A"].kept_caches():
            np.testing.assert_array_equal(seen["A"], core.q["A"].forward(A))
    np.testing.assert_array_equal(seen["C"], eff.C.astype(seen["C"].dtype))
    # the mixing and coder weights after their quantizers
    np.testing.assert_array_equal(recorders["linear"].seen[0][1], layer.mixing_weight())
    np.testing.assert_array_equal(recorders["encoder"].seen[0][1], model.frozen_coder("encoder").weight)


class Offsets:
    """A fixed additive perturbation (float64), the noise of one forward frozen so it can be differentiated."""

    def __init__(self, offsets):
        self.offsets = offsets

    def wants(self, key):
        return key in self.offsets

    def perturb(self, key, value):
        return (value + self.offsets[key]).astype(value.dtype)


def _loss_and_backward(model, x, mode):
    w = np.random.default_rng(8).standard_normal((x.shape[0], model.d_output))

    def loss():
        return float(np.sum(model.forward(x, training=True, mode=mode) * w))
    loss()
    model.backward(w)
    return loss


def _offsets(shape_of, keys, seed=7):
    rng = np.random.default_rng(seed)
    out = {}
    for key in keys:
        shape, cplx = shape_of[key]
        d = 0.05 * rng.standard_normal(shape)
        out[key] = d + 0.05j * rng.standard_normal(shape) if cplx else d
    return out


@pytest.mark.parametrize("mode", MODES)
def test_backward_under_a_fixed_perturbation_matches_finite_differences(mode):
    # float64 float model: with the perturbation of one forward held fixed, the loss is a smooth
    # function of the parameters; every parameter's gradient must be that of the perturbed forward
    model = _model(mode=mode, n_layers=1, dtype=np.float64, d_model=4, d_state=4)
    layer = model.blocks[0].ssm
    H, M = 4, 2
    core_keys = {"dt": ((H,), False), "A": ((H, M), True), "Abar": ((H, M), True), "B": ((H, M), True),
                 "C": ((H, M), True), "D": ((H,), False)}
    asked = ["dt", "A" if mode == "conv" else "Abar", "B", "C", "D"]
    layer.core.perturbation = Offsets(_offsets(core_keys, asked))
    layer.mixing.linear.perturbation = Offsets(_offsets({"weight": ((H, 2 * H), False)}, ["weight"], seed=9))
    model.encoder.perturbation = Offsets(_offsets({"weight": ((2, H), False)}, ["weight"], seed=10))
    model.decoder.perturbation = Offsets(_offsets({"weight": ((H, 3), False)}, ["weight"], seed=11))
    x = _x(n=2, length=6).astype(np.float64)
    try:
        loss = _loss_and_backward(model, x, mode)
        clean_free = {k: g.copy() for k, g in model.grads.items()}
        for name, value in model.params.items():
            numeric = numerical_grad(loss, value)
            assert grad_error(clean_free[name], numeric) <= 1e-6, name
    finally:
        for op in (layer.core, layer.mixing.linear, model.encoder, model.decoder):
            op.perturbation = None


@pytest.mark.parametrize("mode", MODES)
def test_gradient_is_the_ste_gradient_at_the_noisy_values(mode):
    # QAT float64: the noise enters after the quantizer, so the loss is smooth in the offset; the
    # parameter's gradient (the STE: identity on the grid's range) must be d loss / d offset
    # only parameter targets: a kernel / state / act quantizer downstream would make the loss a step function
    quant = QuantConfig(C=256, D=256, linear=256)
    model = _model(quant=quant, mode=mode, n_layers=1, dtype=np.float64, d_model=4, d_state=4)
    layer = model.blocks[0].ssm
    H, M = 4, 2
    offsets = _offsets({"C": ((H, M), True), "D": ((H,), False)}, ["C", "D"])
    weight = _offsets({"weight": ((H, 2 * H), False)}, ["weight"], seed=9)
    layer.core.perturbation, layer.mixing.linear.perturbation = Offsets(offsets), Offsets(weight)
    x = _x(n=2, length=6).astype(np.float64)
    try:
        loss = _loss_and_backward(model, x, mode)
        grads = {k: g.copy() for k, g in model.grads.items()}
        checks = {"layers.0.ssm.C": offsets["C"], "layers.0.ssm.mixing.linear.weight": weight["weight"]}
        if mode == "recurrent":  # D has its quantizer in recurrent mode only; conv adds it to K[0] float
            checks["layers.0.ssm.D"] = offsets["D"]
        for name, delta in checks.items():
            assert grad_error(grads[name], numerical_grad(loss, delta)) <= 1e-6, name
    finally:
        layer.core.perturbation = layer.mixing.linear.perturbation = None


def test_redrawn_per_forward_and_reproducible_per_seed():
    def outputs(seed):
        model = _model(quant=QuantConfig(16), mode="recurrent")
        with transient_noise(model, 0.02, np.random.default_rng(seed), targets=ALL) as block:
            out = [model.forward(_x()) for _ in range(3)]
        return out, block.draws
    a, draws = outputs(5)
    b, _ = outputs(5)
    c, _ = outputs(6)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[0], c[0])
    # per forward: encoder, per layer log_dt, Abar (2), C (2), Bbar (2), D, mixing, decoder
    assert draws == 3 * (1 + 2 * 9 + 1)
    model = _model(mode="recurrent")
    with transient_noise(model, 0.02, np.random.default_rng(0), targets=("C",)) as block:
        model.forward(_x())
    assert block.draws == 2 * 2 and set(block.sites) == {"layers.0.ssm", "layers.1.ssm"}  # C's two parts


def test_model_restored_bit_for_bit_also_after_an_exception():
    model = _model(quant=QuantConfig(16))  # LayerNorm: a training forward changes no buffer
    x = _x()
    snap, clean = _bits(model), model.forward(x)
    with transient_noise(model, 0.1, np.random.default_rng(0), targets=ALL):
        logits = model.forward(x, training=True)
        model.backward(np.ones_like(logits))
    _assert_bits(model, snap)  # a training forward updates BatchNorm's running statistics; not here
    with pytest.raises(RuntimeError, match="boom"):
        with transient_noise(model, 0.1, np.random.default_rng(0), targets=ALL):
            model.forward(x)
            raise RuntimeError("boom")
    assert all(getattr(m, "perturbation", None) is None for _, m in model.modules())
    np.testing.assert_array_equal(model.forward(x), clean)


def test_stream_and_inspection_stay_clean_inside_the_block():
    model = _model(quant=QuantConfig(A=16, C=16, linear=16, coder=16), mode="recurrent")
    x = _x()
    clean_steps = {fused: model.stream(fused=fused).run(x)[0] for fused in (True, False)}
    eff = model.blocks[0].ssm.effective_ssm()
    with transient_noise(model, 0.1, np.random.default_rng(0), targets=ALL):
        for fused in (True, False):
            np.testing.assert_array_equal(model.stream(fused=fused).run(x)[0], clean_steps[fused])
        np.testing.assert_array_equal(model.blocks[0].ssm.effective_ssm().Abar, eff.Abar)


def test_gaussian_source_std_and_order():
    w = np.random.default_rng(0).uniform(-1, 3, (200, 50)) + 1j * np.random.default_rng(1).uniform(0, 2, (200, 50))
    for protocol, scale in (("qs4d", lambda p: p.max() - p.min()), ("absmax", lambda p: np.abs(p).max())):
        rng = np.random.default_rng(4)
        noisy = GaussianSource(0.05, protocol, rng).add(w)
        replay = np.random.default_rng(4)
        re = w.real + 0.05 * scale(w.real) * replay.standard_normal(w.shape)  # real part first
        im = w.imag + 0.05 * scale(w.imag) * replay.standard_normal(w.shape)
        np.testing.assert_array_equal(noisy, re + 1j * im)
        # 10^4 draws: the measured std is within ~1.4% (2 sigma) of the configured one
        for part, n in ((w.real, noisy.real), (w.imag, noisy.imag)):
            assert abs(np.std(n - part) / (0.05 * scale(part)) - 1) < 0.05


def test_a_noisy_unstable_mode_is_left_as_drawn():
    # documented choice: nothing clamps a noisy Re(A) >= 0; the conv kernel of a short sequence stays finite
    model = _model(mode="conv", n_layers=1)

    class Keep(Recorder):
        def perturb(self, key, value):
            out = GaussianSource(0.5, "qs4d", np.random.default_rng(0)).add(value)
            self.seen.append((key, out))
            return out
    keep = Keep()
    model.blocks[0].ssm.core.perturbation = keep
    try:
        assert np.isfinite(model.forward(_x())).all()
    finally:
        model.blocks[0].ssm.core.perturbation = None
    assert (dict(keep.seen)["A"].real > 0).any()


def test_errors():
    model = _model()
    rng = np.random.default_rng(0)
    for sigma in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            with transient_noise(model, sigma, rng):
                pass
    with pytest.raises(ValueError, match="protocol"):
        with transient_noise(model, 0.1, rng, protocol="range"):
            pass
    with pytest.raises(ValueError, match="targets entry"):
        with transient_noise(model, 0.1, rng, targets=("Q",)):
            pass
    with pytest.raises(ValueError, match="targets"):
        with transient_noise(model, 0.1, rng, targets=()):
            pass
    with pytest.raises(TypeError, match="rng"):
        with transient_noise(model, 0.1, 3):
            pass
    with pytest.raises(ValueError, match="'dt'.*discrete"):
        noise_sites(_model(abar="discrete", mode="recurrent"), ("A", "dt"))
    with pytest.raises(ValueError, match="'linear'.*no mixing"):
        noise_sites(_model(mixing=None), ("linear",))
    with pytest.raises(ValueError, match="do not nest"):
        with transient_noise(model, 0.1, rng):
            with transient_noise(model, 0.1, rng):
                pass
    assert all(getattr(m, "perturbation", None) is None for _, m in model.modules())
    analog = to_analog(model, CrossbarConfig.ideal(), calib=_x())
    with pytest.raises(TypeError, match="to_analog"):
        noise_sites(analog, ("coder",))
    assert isinstance(model.encoder, Linear)
