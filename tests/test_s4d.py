"""The S4D layer: gradients (both modes), mode agreement, streaming, float32, inits, bad input."""
import numpy as np
import pytest

import qs4d_np
from qs4d_np import S4D
from reference.gradcheck import grad_error, numerical_grad
from reference.ssm import causal_conv_direct, kernel_explicit

INITS = ["lin", "inv", "real", "qs4d"]
DISCS = ["zoh", "bilinear"]
MODES = ["conv", "recurrent"]
# Central differences with eps=1e-5 balance rounding (~1e-16*|L|/eps) against
# truncation (~eps^2): measured errors stay below ~4e-8 on these sizes, while
# eps=1e-6 puts the rounding share of the small A-gradients near 2e-7.
FD_EPS = 1e-5


def core(init="lin", disc="zoh", learn_B=True, seed=1, **kw):
    """A float64 SSM core (no activation/mixing) with a random B so B's gradient is exercised."""
    kw.setdefault("activation", None)
    kw.setdefault("mixing", None)
    m = S4D(3, 6, init=init, disc=disc, learn_B=learn_B, dtype=np.float64, seed=seed, **kw)
    if learn_B:
        rng = np.random.default_rng(seed + 100)
        m.params["B"][:] = rng.standard_normal((3, 3)) + 1j * rng.standard_normal((3, 3))
    return m


def grads_of(m, u, w, mode):
    m.forward(u, mode=mode)
    du = m.backward(w)
    return du, {k: v.copy() for k, v in m.grads.items()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("disc", DISCS)
@pytest.mark.parametrize("init", INITS)
def test_gradients_match_finite_differences(init, disc, mode):
    m = core(init, disc)
    rng = np.random.default_rng(2)
    u = rng.standard_normal((2, 7, 3))
    w = rng.standard_normal((2, 7, 3))
    loss = lambda: float(np.sum(w * m.forward(u, mode=mode)))
    du, grads = grads_of(m, u, w, mode)
    assert sorted(grads) == ["A_imag", "B", "C", "D", "log_A_real", "log_dt"]
    for name, p in m.params.items():
        assert grads[name].shape == p.shape and grads[name].dtype == p.dtype, name
        assert grad_error(grads[name], numerical_grad(loss, p, eps=FD_EPS)) <= 1e-6, name
    assert grad_error(du, numerical_grad(loss, u, eps=FD_EPS)) <= 1e-6


@pytest.mark.parametrize("disc", DISCS)
@pytest.mark.parametrize("init", INITS)
def test_modes_and_streaming_agree(init, disc):
    m = core(init, disc, seed=3)
    rng = np.random.default_rng(4)
    u = rng.standard_normal((2, 50, 3))
    w = rng.standard_normal(u.shape)
    y_conv = m.forward(u, mode="conv")
    y_rec = m.forward(u, mode="recurrent")
    K = m.kernel(50)
    y_direct = causal_conv_direct(u, K) + m.params["D"] * u
    state = m.initial_state(2)
    y_step = np.empty_like(u)
    for t in range(u.shape[1]):
        y_step[:, t], state = m.step(u[:, t], state)
    scale = np.max(np.abs(y_direct))
    for y in (y_conv, y_rec, y_step):
        assert np.max(np.abs(y - y_direct)) <= 1e-10 * scale
    du_c, g_c = grads_of(m, u, w, "conv")
    du_r, g_r = grads_of(m, u, w, "recurrent")
    assert grad_error(du_r, du_c) <= 1e-10
    for name in g_c:
        assert grad_error(g_r[name], g_c[name]) <= 1e-10, name


def test_length_one():
    m = core("inv", "zoh", seed=13)
    u = np.random.default_rng(14).standard_normal((2, 1, 3))
    y, state = m.step(u[:, 0], m.initial_state(2))
    np.testing.assert_allclose(m.forward(u, mode="conv")[:, 0], y, rtol=1e-12)
    np.testing.assert_allclose(m.forward(u, mode="recurrent")[:, 0], y, rtol=1e-12)
    du_c, g_c = grads_of(m, u, u, "conv")
    du_r, g_r = grads_of(m, u, u, "recurrent")
    assert grad_error(du_r, du_c) <= 1e-12
    assert all(grad_error(g_r[k], g_c[k]) <= 1e-12 for k in g_c)


def test_kernel_is_C_Bbar_Abar_powers():
    m = core("lin", "bilinear")
    d = m.discrete()
    np.testing.assert_allclose(m.kernel(20), kernel_explicit(m.params["C"], d.Bbar, d.Abar, 20), atol=1e-13)


@pytest.mark.parametrize("mode", MODES)
def test_float32_close_to_float64(mode):
    m32 = S4D(8, 16, activation=None, mixing=None, seed=5)
    m64 = S4D(8, 16, activation=None, mixing=None, dtype=np.float64, seed=5)
    for name, p in m64.params.items():
        p[...] = m32.params[name]
    u = np.random.default_rng(6).standard_normal((3, 300, 8))
    y64 = m64.forward(u, mode=mode)
    y32 = m32.forward(u.astype(np.float32), mode=mode)
    assert y32.dtype == np.float32
    # float32 carries ~6e-8 relative rounding; a 300-step recurrence and FFTs
    # of length 600 grow it by a few hundred at most
    assert np.max(np.abs(y32 - y64)) <= 1e-4 * np.max(np.abs(y64))


def test_inits_and_seeds():
    H, N = 2, 8
    n = np.arange(N // 2)
    expect = {"lin": np.pi * n, "qs4d": np.pi * n / 4, "inv": N / np.pi * (N / (2 * n + 1) - 1), "real": 0 * n}
    for init, A_imag in expect.items():
        p = S4D(H, N, init=init, dtype=np.float64, seed=0).params
        np.testing.assert_allclose(p["A_imag"], np.tile(A_imag, (H, 1)))
        log_A_real = np.log(n + 1) if init == "real" else np.full(N // 2, np.log(0.5))
        np.testing.assert_allclose(p["log_A_real"], np.tile(log_A_real, (H, 1)))
    p = S4D(64, 4, dt_min=0.01, dt_max=0.02, seed=1).params
    assert np.all((p["log_dt"] >= np.log(0.01) - 1e-6) & (p["log_dt"] <= np.log(0.02) + 1e-6))
    assert p["C"].dtype == np.complex64 and p["log_dt"].dtype == np.float32
    a, b, c = (S4D(4, 8, dropout=0.1, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert not np.array_equal(a.params["C"], c.params["C"])
    assert not np.array_equal(a.params["mixing.linear.weight"], c.params["mixing.linear.weight"])
    assert "B" not in a.params and np.array_equal(S4D(2, 4, learn_B=True).params["B"], np.ones((2, 2)))
    assert sorted(a.params) == ["A_imag", "C", "D", "log_A_real", "log_dt",
                                "mixing.linear.bias", "mixing.linear.weight"]
    assert qs4d_np.S4D is S4D and "S4D" in qs4d_np.__all__


@pytest.mark.parametrize("mode", MODES)
def test_full_block_gradients_and_streaming(mode):
    m = S4D(3, 4, activation="gelu", mixing="glu", dropout=0.3, learn_B=True, dtype=np.float64, seed=9)
    rng = np.random.default_rng(10)
    u = rng.standard_normal((2, 6, 3))
    w = rng.standard_normal(u.shape)
    loss = lambda: float(np.sum(w * m.forward(u, mode=mode)))  # not training: dropout is the identity
    du, grads = grads_of(m, u, w, mode)
    assert "mixing.linear.weight" in grads
    for name, p in m.params.items():
        assert grad_error(grads[name], numerical_grad(loss, p, eps=FD_EPS)) <= 1e-6, name
    assert grad_error(du, numerical_grad(loss, u, eps=FD_EPS)) <= 1e-6
    y = m.forward(u, mode=mode)
    state = m.initial_state(2)
    for t in range(u.shape[1]):
        y_t, state = m.step(u[:, t], state)
        np.testing.assert_allclose(y_t, y[:, t], rtol=1e-10, atol=1e-12)
    # streaming must not disturb the cache of the last forward
    assert grad_error(m.backward(w), du) <= 1e-12


def test_block_order_and_channel_dropout():
    m = S4D(4, 4, activation="relu", mixing=None, dropout=0.5, dtype=np.float64, seed=11)
    u = np.random.default_rng(12).standard_normal((3, 20, 4))
    ref = np.maximum(m.forward(u), 0)  # eval: relu(ssm), no dropout
    y = m.forward(u, training=True)
    kept = np.all(np.isclose(y, 2 * ref), axis=1)
    dropped = np.all(y == 0, axis=1)
    assert np.all(kept | dropped) and kept.any() and dropped.any()


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(d_state=5), ValueError, "d_state must be even"),
    (dict(d_state=0), ValueError, "d_state must be >= 2"),
    (dict(d_state=2.0), TypeError, "d_state must be an integer"),
    (dict(d_model=0), ValueError, "d_model must be >= 1"),
    (dict(init="hippo"), ValueError, "init must be one of"),
    (dict(disc="euler"), ValueError, "disc must be one of"),
    (dict(activation="tanh"), ValueError, "activation must be one of"),
    (dict(mixing="linear"), ValueError, "mixing must be one of"),
    (dict(dt_min=0.1, dt_max=0.1), ValueError, "dt_max must be > dt_min"),
    (dict(dt_min=0.0), ValueError, "dt_min must be > 0"),
    (dict(dt_min=-1e-3), ValueError, "dt_min must be > 0"),
    (dict(dropout=1.0), ValueError, "dropout must be < 1"),
    (dict(dtype=np.int32), ValueError, "dtype must be one of"),
    (dict(learn_B=1), TypeError, "learn_B must be a bool"),
])
def test_bad_construction(kwargs, err, match):
    args = dict(d_model=2, d_state=4)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        S4D(**args)


def test_bad_calls():
    m = S4D(3, 4, seed=0)
    with pytest.raises(RuntimeError, match="before forward"):
        m.backward(np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="u must have 3 dimensions"):
        m.forward(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"u must have shape \(batch, length, 3\)"):
        m.forward(np.zeros((1, 5, 4)))
    with pytest.raises(ValueError, match="batch >= 1 and length >= 1"):
        m.forward(np.zeros((1, 0, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        m.forward(np.full((1, 5, 3), np.nan))
    with pytest.raises(ValueError, match="mode must be one of"):
        m.forward(np.zeros((1, 5, 3)), mode="scan")
    for mode in MODES:
        m.forward(np.zeros((1, 5, 3)), mode=mode)
        with pytest.raises(ValueError, match=r"grad must have the forward output's shape \(1, 5, 3\)"):
            m.backward(np.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match="L must be >= 1"):
        m.kernel(0)
    with pytest.raises(ValueError, match=r"u_t must have shape \(batch, 3\)"):
        m.step(np.zeros((2, 4)), m.initial_state(2))
    with pytest.raises(ValueError, match=r"state must have shape \(2, 3, 2\)"):
        m.step(np.zeros((2, 3)), m.initial_state(1))
