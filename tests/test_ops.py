"""Core ops: float64 finite-difference checks of every backward, input checks, properties."""
import numpy as np
import pytest

from qs4d_np.core.activations import GELU, GLU, ReLU
from qs4d_np.core.dropout import Dropout
from qs4d_np.core.linear import Linear
from qs4d_np.core.loss import SoftmaxCrossEntropy
from qs4d_np.core.mixing import PointwiseGLU
from qs4d_np.core.norm import BatchNorm, LayerNorm
from qs4d_np.core.pooling import LastPool, MeanPool
from reference import ops as ref
from reference.gradcheck import grad_error, numerical_grad

TOL = 1e-6  # float64 central differences with eps=1e-6 are accurate to ~1e-9 here


def check_op_grads(op, x, training=False, reseed=None):
    """FD-check dx and every param grad of L = sum(forward(x) * R) for a fixed random R."""
    rng = np.random.default_rng(123)

    def run():
        if reseed is not None:
            reseed()
        return op.forward(x, training=training)

    R = rng.standard_normal(run().shape)
    loss = lambda: float(np.sum(run() * R))
    run()
    dx = op.backward(R.copy())
    assert dx.shape == x.shape
    assert grad_error(dx, numerical_grad(loss, x)) <= TOL
    for name, p in op.params.items():
        run()
        op.backward(R.copy())
        analytic = op.grads[name].copy()
        assert analytic.shape == p.shape, name
        assert grad_error(analytic, numerical_grad(loss, p)) <= TOL, name


def test_linear_grads_and_reference():
    rng = np.random.default_rng(0)
    lin = Linear(4, 3, dtype=np.float64, seed=1)
    x = rng.standard_normal((2, 5, 4))
    y = lin.forward(x)
    np.testing.assert_allclose(y, ref.linear(x, lin.params["weight"], lin.params["bias"]), rtol=1e-13, atol=1e-13)
    check_op_grads(lin, x)
    g = rng.standard_normal(y.shape)
    lin.forward(x)
    dx = lin.backward(g)
    rdx, rdw, rdb = ref.linear_backward(x, lin.params["weight"], g)
    np.testing.assert_allclose(dx, rdx, atol=1e-12)
    np.testing.assert_allclose(lin.grads["weight"], rdw, atol=1e-12)
    np.testing.assert_allclose(lin.grads["bias"], rdb, atol=1e-12)
    check_op_grads(Linear(3, 2, bias=False, dtype=np.float64, seed=2), rng.standard_normal((7, 3)))


def test_linear_init_like_pytorch_and_seeded():
    lin = Linear(100, 50, seed=3)
    w = lin.params["weight"]
    assert w.shape == (100, 50) and w.dtype == np.float32 and lin.params["bias"].shape == (50,)
    assert np.abs(w).max() <= 0.1 and np.abs(w).max() > 0.09  # uniform(-1/sqrt(100), 1/sqrt(100))
    np.testing.assert_array_equal(w, Linear(100, 50, seed=3).params["weight"])
    assert not np.array_equal(w, Linear(100, 50, seed=4).params["weight"])


def test_linear_weight_bias_and_a_swapped_weight():
    rng = np.random.default_rng(4)
    lin = Linear(4, 3, dtype=np.float64, seed=1)
    assert lin.weight is lin.params["weight"] and lin.bias is lin.params["bias"]
    assert Linear(4, 3, bias=False).bias is None
    W, W2 = lin.weight, rng.standard_normal((4, 3))
    x, g = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 3))
    with lin.swapped_weight(W2):
        assert lin.weight is W2
        np.testing.assert_allclose(lin.forward(x), x @ W2 + lin.bias, rtol=1e-13)
        np.testing.assert_allclose(lin.backward(g), g @ W2.T, rtol=1e-13)
    assert lin.weight is W and lin.params["weight"] is W  # the parameter is back, unchanged
    np.testing.assert_allclose(lin.grads["weight"], np.einsum("bli,blo->io", x, g), rtol=1e-12)  # dL/dW2
    with pytest.raises(ValueError, match="boom"), lin.swapped_weight(W2):
        raise ValueError("boom")
    assert lin.weight is W  # restored after an error too
    with pytest.raises(ValueError, match=r"W must have shape \(4, 3\), got \(3, 4\)"), lin.swapped_weight(W2.T):
        pass


def test_linear_bad_input():
    lin = Linear(4, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\), got \(2, 5\)"):
        lin.forward(np.zeros((2, 5)))
    lin.forward(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="grad must have shape"):
        lin.backward(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="d_out must be >= 1"):
        Linear(3, 0)
    with pytest.raises(TypeError, match="dtype"):
        Linear(3, 2, dtype=np.int32)


@pytest.mark.parametrize("op_cls", [GELU, ReLU])
def test_pointwise_activation_grads(op_cls):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4)) * 2
    x[np.abs(x) < 1e-3] = 0.5  # keep FD away from ReLU's kink
    check_op_grads(op_cls(), x)


def test_activation_values_match_reference():
    x = np.linspace(-6, 6, 101).reshape(1, 1, -1)
    np.testing.assert_allclose(GELU().forward(x), ref.gelu(x), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(ReLU().forward(x), ref.relu(x))
    y32 = GELU().forward(x.astype(np.float32))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, ref.gelu(x), rtol=1e-6, atol=1e-6)
    # limits: GELU(0) = 0, GELU(x) = x for large x, 0 for very negative x (no NaN from erf's tails)
    np.testing.assert_array_equal(GELU().forward(np.array([0.0, 40.0, -40.0])), [0.0, 40.0, -0.0])


def test_glu_grads_and_values():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 6))
    glu = GLU()
    np.testing.assert_allclose(glu.forward(x), ref.glu(x), rtol=1e-14)
    check_op_grads(glu, x)
    with pytest.raises(ValueError, match="even, non-zero last axis"):
        glu.forward(np.zeros((2, 5)))


def test_pointwise_glu_grads_and_values():
    rng = np.random.default_rng(3)
    mix = PointwiseGLU(3, dtype=np.float64, seed=4)
    assert sorted(mix.params) == ["linear.bias", "linear.weight"]
    assert mix.params["linear.weight"].shape == (3, 6)
    x = rng.standard_normal((2, 4, 3))
    w, b = mix.params["linear.weight"], mix.params["linear.bias"]
    np.testing.assert_allclose(mix.forward(x), ref.glu(ref.linear(x, w, b)), rtol=1e-13, atol=1e-14)
    check_op_grads(mix, x)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\)"):
        mix.forward(np.zeros((2, 4, 5)))


def test_dropout_grads_and_mask_structure():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5, 4)) + 3.0  # no zeros in x, so zeros in y come from the mask
    for shared in (True, False):
        d = Dropout(0.4, shared_over_time=shared, seed=7)

        def reseed(d=d):
            d.rng = np.random.default_rng(7)

        check_op_grads(d, x, training=True, reseed=reseed)
        reseed()
        y = d.forward(x, training=True)
        kept = y != 0
        np.testing.assert_allclose(y[kept], x[kept] / 0.6, rtol=1e-14)
        if shared:
            # one decision per (batch, channel), the same at every time step
            assert (kept == kept[:, :1, :]).all()
        assert 0 < kept.mean() < 1


def test_dropout_identity_and_rate():
    x = np.ones((200, 3, 50), dtype=np.float32)
    d = Dropout(0.25, seed=0)
    assert d.forward(x, training=False) is x
    assert Dropout(0.0).forward(x, training=True) is x
    y = d.forward(x, training=True)
    assert y.dtype == np.float32
    assert abs((y[:, 0, :] == 0).mean() - 0.25) < 0.02  # 10,000 channel draws: sd ~0.004
    assert abs(y.mean() - 1.0) < 0.03  # inverted scaling keeps the mean
    np.testing.assert_array_equal(y, Dropout(0.25, seed=0).forward(x, training=True))
    g = d.backward(np.ones_like(y))
    np.testing.assert_array_equal(g, y)  # mask applied to the gradient


def test_dropout_bad_input():
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match="p must be"):
            Dropout(p)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, length, channels\)"):
        Dropout(0.1).forward(np.zeros((2, 3)), training=True)
    Dropout(0.1, shared_over_time=False).forward(np.zeros((2, 3)), training=True)
    with pytest.raises(RuntimeError, match="before forward"):
        Dropout(0.1).backward(np.zeros((1, 1, 1)))


# -- norms ---------------------------------------------------------------
def randomize_affine(op, rng):
    op.params["weight"][...] = rng.standard_normal(op.d) + 1.0
    op.params["bias"][...] = rng.standard_normal(op.d)


def test_layernorm_grads_and_values():
    rng = np.random.default_rng(5)
    ln = LayerNorm(4, dtype=np.float64)
    randomize_affine(ln, rng)
    x = rng.standard_normal((2, 3, 4)) * 3 + 1
    y, _, _ = ref.layernorm(x, ln.params["weight"], ln.params["bias"], 1e-5)
    np.testing.assert_allclose(ln.forward(x), y, rtol=1e-12, atol=1e-12)
    check_op_grads(ln, x)
    plain = LayerNorm(4, dtype=np.float64).forward(x)  # weight 1, bias 0
    np.testing.assert_allclose(plain.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(plain.var(-1), 1, rtol=1e-4)  # eps=1e-5 against var ~9


def test_batchnorm_training_grads_and_running_stats():
    rng = np.random.default_rng(6)
    bn = BatchNorm(3, momentum=0.2, dtype=np.float64)
    randomize_affine(bn, rng)
    x = rng.standard_normal((2, 5, 3)) * 2 + 0.5
    y, mean, var = ref.batchnorm_train(x, bn.params["weight"], bn.params["bias"], 1e-5)
    np.testing.assert_allclose(bn.forward(x, training=True), y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_mean"], 0.2 * mean, rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"], 0.8 + 0.2 * var * 10 / 9, rtol=1e-12)
    assert set(bn.params) == {"weight", "bias"}  # running stats are buffers, not params
    check_op_grads(bn, x, training=True)


def trained_batchnorm(rng, dtype):
    """A BatchNorm(3) with random affine parameters and running statistics, as after training."""
    bn = BatchNorm(3, dtype=dtype)
    randomize_affine(bn, rng)
    bn.buffers["running_mean"][...] = rng.standard_normal(3)
    bn.buffers["running_var"][...] = rng.random(3) + 0.5
    return bn


def test_batchnorm_eval_uses_running_stats():
    rng = np.random.default_rng(7)
    bn = trained_batchnorm(rng, np.float64)
    x = rng.standard_normal((2, 4, 3))
    before = {k: v.copy() for k, v in bn.buffers.items()}
    want = ref.batchnorm_eval(x, bn.params["weight"], bn.params["bias"],
                              bn.buffers["running_mean"], bn.buffers["running_var"], 1e-5)
    np.testing.assert_allclose(bn.forward(x), want, rtol=1e-12, atol=1e-12)
    for k in before:
        np.testing.assert_array_equal(bn.buffers[k], before[k])
    check_op_grads(bn, x, training=False)


def test_batchnorm_folds_and_layernorm_exposes_its_parameters():
    rng = np.random.default_rng(8)
    bn = trained_batchnorm(rng, np.float32)
    scale, shift = bn.folded()
    assert scale.dtype == shift.dtype == np.float64 and scale.shape == shift.shape == (3,)
    x = rng.standard_normal((2, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(bn.forward(x), scale * x + shift, rtol=1e-6, atol=1e-6)  # float32 rounding
    assert bn.weight is bn.params["weight"] and bn.bias is bn.params["bias"]
    ln = LayerNorm(3, eps=1e-3)
    assert ln.weight is ln.params["weight"] and ln.bias is ln.params["bias"] and ln.eps == 1e-3
    assert not hasattr(ln, "folded")  # its statistics are per position: no per-channel fold


def test_norm_bad_input():
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\), got \(2, 3\)"):
        LayerNorm(4).forward(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm(4).forward(np.zeros((1, 1, 4)), training=True)
    with pytest.raises(ValueError, match="eps must be > 0"):
        LayerNorm(4, eps=0.0)
    with pytest.raises(ValueError, match="momentum must be <= 1"):
        BatchNorm(4, momentum=2.0)


# -- pooling and loss ----------------------------------------------------
@pytest.mark.parametrize("pool_cls, twin", [(MeanPool, ref.mean_pool), (LastPool, ref.last_pool)])
def test_pooling(pool_cls, twin):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 5, 3))
    pool = pool_cls()
    np.testing.assert_allclose(pool.forward(x), twin(x), rtol=1e-14)
    check_op_grads(pool, x)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, length >= 1, channels\)"):
        pool.forward(np.zeros((2, 3)))


def test_cross_entropy_value_grad_and_stability():
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((4, 5))
    labels = np.array([0, 4, 2, 2])
    ce = SoftmaxCrossEntropy()
    want_loss, want_grad = ref.softmax_cross_entropy(logits, labels)
    assert abs(ce.forward(logits, labels) - want_loss) < 1e-14
    np.testing.assert_allclose(ce.backward(), want_grad, rtol=1e-13, atol=1e-15)
    num = numerical_grad(lambda: ce.forward(logits, labels), logits)
    ce.forward(logits, labels)
    assert grad_error(ce.backward(), num) <= TOL
    # uniform logits: loss = log(classes); huge logits do not overflow
    assert abs(ce.forward(np.zeros((3, 7)), np.array([1, 2, 3])) - np.log(7)) < 1e-14
    big = np.array([[1000.0, 0.0], [0.0, 1000.0]], dtype=np.float32)
    assert ce.forward(big, np.array([0, 0])) == pytest.approx(500.0)
    assert ce.backward().dtype == np.float32


def test_cross_entropy_bad_input():
    ce = SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got \[3\]"):
        ce.forward(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got \[-1\]"):
        ce.forward(np.zeros((2, 3)), np.array([-1, 0]))
    with pytest.raises(TypeError, match="labels must be integers"):
        ce.forward(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        ce.forward(np.zeros((2, 3)), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="logits contains 1 non-finite"):
        ce.forward(np.array([[0.0, np.nan]]), np.array([0]))
