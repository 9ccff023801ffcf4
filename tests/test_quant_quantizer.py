"""The stateful Quantizer: STE gradients by finite differences, LSQ step, running calibration."""
import numpy as np
import pytest

from qs4d_np.quant.fake import QuantSpec
from qs4d_np.quant.quantizer import Quantizer
from reference.gradcheck import grad_error, numerical_grad
from reference.quant import round_ref


def _loss_parts(seed, shape, complex_=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    w = rng.normal(size=shape)
    if complex_:
        x = x + 1j * rng.normal(size=shape)
        w = w + 1j * rng.normal(size=shape)
    return x, w


def _model(x, w):
    """A nonlinear scalar loss of a (possibly complex) tensor."""
    return float(np.sum(w.real * np.tanh(1.3 * x.real)) + np.sum(w.imag * np.sin(x.imag)))


def _model_grad(x, w):
    return w.real * 1.3 / np.cosh(1.3 * x.real) ** 2 + 1j * w.imag * np.cos(x.imag) if np.iscomplexobj(x) \
        else w * 1.3 / np.cosh(1.3 * x) ** 2


@pytest.mark.parametrize("ste", ["identity", "clipped"])
@pytest.mark.parametrize("axis, complex_", [(None, False), (1, False), (None, True), (0, True)])
def test_ste_gradient_matches_fd_of_the_identity_model(ste, axis, complex_):
    # 2**40 states: the step (~1e-12) is far below what the FD check resolves, so the
    # STE gradient of the quantized model must equal the gradient of the float model
    x, w = _loss_parts(0, (4, 3), complex_)
    q = Quantizer(2**40, ste=ste, axis=axis, dtype=np.float64)
    x_hat = q.forward(x, training=True)
    dx = q.backward(_model_grad(x_hat, w))
    num = numerical_grad(lambda: _model(x, w), x)
    assert grad_error(dx, num) <= 1e-6


@pytest.mark.parametrize("ste", ["identity", "clipped"])
@pytest.mark.parametrize("axis, complex_", [(None, False), (1, False), (None, True), (0, True)])
def test_saturating_ste_gradient_matches_fd_of_the_clipped_model(ste, axis, complex_):
    # a fixed range of 0.8 on 2**40 states: inside it the quantizer is the identity to ~1e-12,
    # outside it clamps, so the quantized model is the model of clip(x) (of each part). The clipped
    # STE must be that model's gradient: zero on the saturated entries (about 40% here); the
    # identity STE passes the gradient there too, which the same FD check must reject
    x, w = _loss_parts(3, (4, 3), complex_)
    R = 0.8
    q = Quantizer(2**40, ste=ste, axis=axis, scale_mode="fixed", fixed_range=R, dtype=np.float64)
    x_hat = q.forward(x, training=True)
    dx = q.backward(_model_grad(x_hat, w))

    def clip_parts(z):
        return np.clip(z.real, -R, R) + 1j * np.clip(z.imag, -R, R) if complex_ else np.clip(z, -R, R)
    num = numerical_grad(lambda: _model(clip_parts(x), w), x)
    parts = np.stack([x.real, x.imag]) if complex_ else x
    assert 0.2 < np.mean(np.abs(parts) > R) < 0.8  # enough saturated and enough free entries
    # no entry is within the FD step of the clip point, where the clipped model has a kink
    assert np.abs(np.abs(parts) - R).min() > 1e-3
    error = grad_error(dx, num)
    assert error <= 1e-6 if ste == "clipped" else error > 0.1


@pytest.mark.parametrize("axis, n_scales", [(None, 1), (1, 3)])
def test_lsq_step_and_clipped_ste_match_fd_of_the_frozen_residual_surrogate(axis, n_scales):
    """LSQ treats round(v) as v + r with r frozen: the surrogate
    x_hat(x, step) = (clip(x/step, qmin - 1/2, qmax + 1/2) + r) * step, with r = code - clip(v)
    at the current point, has exactly the hand-written gradients (saturation starts where
    ties-to-even rounding would leave the grid)."""
    x, w = _loss_parts(1, (8, 3))
    x *= 1.5  # a range of 1 on 9 states: several entries saturate
    q = Quantizer(9, scale_mode="learned", ste="clipped", init_range=1.0, lsq_grad_scale=False,
                  axis=axis, n_scales=n_scales, dtype=np.float64)
    x_hat = q.forward(x, training=True)
    dx = q.backward(w)
    state = q.last_state()
    inv0 = state.layout.broadcast(state.inv)
    g = state.grid
    v0 = np.clip(x * inv0, g.qmin - 0.5, g.qmax + 0.5)
    r = np.clip(round_ref(v0, "half_even"), g.qmin, g.qmax) - v0
    step = q.params["step"].copy()

    def surrogate():
        inv = state.layout.broadcast(1.0 / step)
        return float(np.sum(w * (np.clip(x * inv, g.qmin - 0.5, g.qmax + 0.5) + r) / inv))

    assert np.allclose(surrogate(), np.sum(w * x_hat), rtol=1e-13)  # same point
    assert grad_error(dx, numerical_grad(surrogate, x)) <= 1e-6
    assert grad_error(q.grads["step"], numerical_grad(surrogate, step)) <= 1e-6
    saturated = np.abs(x * inv0) > g.qmax + 0.5
    assert saturated.any() and np.all(dx[saturated] == 0) and np.all(dx[~saturated] == w[~saturated])
    # with LSQ's gradient scale the step gradient shrinks by 1/sqrt(count * qpos)
    q.lsq_grad_scale = True
    q.forward(x, training=True)
    q.backward(w)
    count = x.size // n_scales
    np.testing.assert_allclose(q.grads["step"] * np.sqrt(count * g.qpos), numerical_grad(surrogate, step),
                               rtol=1e-6, atol=0)


def test_learned_step_initialisation_and_in_place_updates():
    x, _ = _loss_parts(2, (50, 4))
    q = Quantizer(15, scale_mode="learned", axis=1, n_scales=4, dtype=np.float64)
    step = q.params["step"]
    assert np.isfinite(step).all() and not q.step_ready  # a finite placeholder, flagged unset
    with pytest.raises(RuntimeError, match="has no step yet"):
        q.static_scales()
    q.forward(x, training=True)
    assert q.step_ready
    np.testing.assert_allclose(step, 2 * np.abs(x).mean(axis=0) / np.sqrt(7), rtol=1e-12)
    before = q.forward(x)
    step *= 2.0  # what an optimizer does to the shared array
    assert not np.array_equal(q.forward(x), before)
    with pytest.raises(ValueError, match="n_scales=4 scales but its input needs 1"):
        q.forward(x[:, :1])


def test_running_range_calibrates_in_training_and_freezes_in_eval():
    rng = np.random.default_rng(3)
    q = Quantizer(31, scale_mode="running", momentum=0.25, dtype=np.float64)
    with pytest.raises(RuntimeError, match="no calibrated range"):
        q.forward(rng.normal(size=(2, 5)))
    a, b = rng.normal(size=(4, 5)), 3 * rng.normal(size=(4, 5))
    q.forward(a, training=True)
    q.forward(b, training=True)
    ra, rb = np.abs(a).max(), np.abs(b).max()
    np.testing.assert_allclose(q.buffers["running_hi"], 0.75 * ra + 0.25 * rb, rtol=1e-15)
    frozen = {k: v.copy() for k, v in q.buffers.items()}
    # evaluation: a sample's output does not depend on the rest of the batch, buffers untouched
    x = rng.normal(size=(3, 5))
    y1 = q.forward(x)
    y2 = q.forward(np.concatenate([x[:1], 100 * x[1:]]))
    assert np.array_equal(y1[0], y2[0])
    assert all(np.array_equal(q.buffers[k], frozen[k]) for k in frozen)
    # training with a large batch moves the range
    q.forward(100 * x, training=True)
    assert q.buffers["running_hi"][0] > frozen["running_hi"][0]
    q2 = Quantizer(31, scale_mode="running", dtype=np.float64)
    q2.load_buffers(frozen)
    assert np.array_equal(q2.forward(x), y1)


def test_float32_and_absmax_match_the_functional_path():
    from qs4d_np.quant.fake import fake_quant
    x = np.random.default_rng(4).normal(size=(2, 7, 3)).astype(np.float32)
    q = Quantizer(16, grid="qs4d", axis=-1, dtype=np.float32)
    out = q.forward(x)
    assert out.dtype == np.float32 and q.bits == 5
    assert np.array_equal(out, fake_quant(x, 16, grid="qs4d", axis=-1))


def test_quantizer_bad_options():
    with pytest.raises(ValueError, match="scale_mode must be one of"):
        Quantizer(8, scale_mode="minmax")
    with pytest.raises(TypeError, match="unknown Quantizer option"):
        Quantizer(8, granularity="tensor")
    with pytest.raises(ValueError, match="learned' needs symmetric=True"):
        Quantizer(8, scale_mode="learned", symmetric=False)
    with pytest.raises(ValueError, match="fixed_range is only used"):
        Quantizer(8, fixed_range=1.0)
    with pytest.raises(ValueError, match="ste must be one of"):
        Quantizer(8, ste="masked")
    with pytest.raises(RuntimeError, match="before forward"):
        Quantizer(8).backward(np.ones(3))
    q = Quantizer(8, name="act")
    with pytest.raises(ValueError, match="act contains 1 non-finite"):
        q.forward(np.array([0.0, np.nan]))


def test_learned_step_flag_round_trips_and_reset_reinitialises():
    x, _ = _loss_parts(5, (40, 3))
    q = Quantizer(15, scale_mode="learned", axis=1, n_scales=3, dtype=np.float64)
    q.forward(x, training=True)
    saved = {"step": q.params["step"].copy(), "step_ready": q.buffers["step_ready"].copy()}
    # a fresh quantizer given the saved arrays in place (what a model load does) needs no init
    q2 = Quantizer(15, scale_mode="learned", axis=1, n_scales=3, dtype=np.float64)
    q2.params["step"][...] = saved["step"]
    q2.buffers["step_ready"][...] = saved["step_ready"]
    assert np.array_equal(q2.forward(3 * x), q.forward(3 * x))  # not re-initialised from 3x
    q2.reset_step()
    q2.forward(3 * x)
    np.testing.assert_allclose(q2.params["step"], 3 * saved["step"], rtol=1e-12)
    assert Quantizer(15, scale_mode="learned", init_range=7.0).step_ready


def test_load_buffers_rejects_bad_ranges():
    q = Quantizer(15, scale_mode="running", n_scales=2, name="act")
    good = {"running_lo": np.array([-1.0, -2.0]), "running_hi": np.array([1.0, 2.0])}
    q.load_buffers(good)
    assert q.calibrated and np.array_equal(q.buffers["running_hi"], good["running_hi"])
    cases = [
        ({**good, "running_lo": np.array([-1.0, np.nan])}, "'act': buffer running_lo holds NaN or inf"),
        ({**good, "running_hi": np.array([1.0, np.inf])}, "buffer running_hi holds NaN or inf"),
        ({**good, "running_hi": np.array([1.0])}, r"buffer running_hi has shape \(1,\), expected \(2,\)"),
        ({**good, "running_lo": np.zeros((2, 1))}, r"buffer running_lo has shape \(2, 1\)"),
        ({**good, "running_lo": np.array([-1.0, 3.0])}, "need running_lo <= running_hi"),
        ({**good, "running_lo": np.array(["a", "b"])}, "must be real numbers"),
    ]
    for bad, message in cases:
        fresh = Quantizer(15, scale_mode="running", n_scales=2, name="act")
        with pytest.raises(ValueError, match=message):
            fresh.load_buffers(bad)
        assert not fresh.calibrated  # nothing half-loaded
    one = Quantizer(15, scale_mode="running", name="act")
    with pytest.raises(ValueError, match=r"expected \(1,\)"):
        one.load_buffers(good)  # two scales' ranges for a one-scale quantizer


def test_quantizer_takes_a_spec_as_built():
    from qs4d_np.quant.config import QuantConfig
    spec = QuantSpec(16, rounding="floor", axis=0)
    q = Quantizer(spec, scale_mode="running", n_scales=3)
    assert q.spec is spec  # no round trip through keyword options
    with pytest.raises(TypeError, match="either a QuantSpec or levels with spec options"):
        Quantizer(spec, grid="qs4d")
    cfg = QuantConfig(16, per_channel=True)
    built = cfg.quantizer_for("A", 0, axis=0, n_scales=8, max_modulus=1.0)
    assert built.spec == QuantSpec(16, axis=0, complex_mode="cartesian", max_modulus=1.0)
