"""S4DModel and its block: whole-model float64 gradient checks, mode agreement, presets, files, bad input."""
import itertools
import json

import numpy as np
import pytest

from qs4d_np.core.loss import SoftmaxCrossEntropy
from qs4d_np.core.norm import BatchNorm, LayerNorm
from qs4d_np.models.s4d_model import S4DModel
from reference.gradcheck import grad_error, numerical_grad

TINY = dict(d_model=3, d_state=4, n_layers=2, dtype=np.float64)
# The 12-variant FD grid uses one block (stacking is covered by the other FD tests).
# d_model >= 3: LayerNorm over 2 channels only outputs +-1 (flat, FD-noise-dominated gradients).
ONE_BLOCK = dict(TINY, n_layers=1)
TOL = 1e-6
# Finite-difference step. Some SSM gradients (e.g. the second layer's log_A_real) are ~1e-4
# of the O(1) loss, so with eps=1e-6 the rounding noise of the differences, ~1e-16*|L|/eps
# ~ 1e-10, is already ~1e-6 of them (measured 1.7e-6); at eps=1e-4 the O(eps^2) truncation
# error reaches 1.2e-6 for a prenorm BatchNorm variant. eps=3e-5 balances the two:
# measured worst error 1.1e-7 over both cases.
FD_EPS = 3e-5


def generators(model):
    return [m.rng for _, m in model.modules() if isinstance(getattr(m, "rng", None), np.random.Generator)]


def check_model_grads(model, x, training, mode=None):
    """FD-check dL/dx and every parameter gradient of L = sum(logits * R).

    Dropout generators are rewound before every forward, so each evaluation
    draws the same masks (in training the masks are part of the function).
    """
    states = [g.bit_generator.state for g in generators(model)]

    def run():
        for g, s in zip(generators(model), states):
            g.bit_generator.state = s
        return model.forward(x, training=training, mode=mode)

    R = np.random.default_rng(99).standard_normal(run().shape)
    loss = lambda: float(np.sum(run() * R))
    run()
    dx = model.backward(R.copy())
    analytic = {k: v.copy() for k, v in model.grads.items()}
    assert set(analytic) == set(model.params)
    assert grad_error(dx, numerical_grad(loss, x, eps=FD_EPS)) <= TOL
    for name, p in model.params.items():
        assert analytic[name].shape == p.shape and analytic[name].dtype == p.dtype, name
        num = numerical_grad(loss, p, eps=FD_EPS)
        if np.max(np.abs(num)) < 1e-9:
            # structurally zero (the encoder bias under a prenorm BatchNorm that removes
            # the channel mean): a relative error is undefined, compare absolutely
            assert np.max(np.abs(analytic[name])) < 1e-9, name
            continue
        err = grad_error(analytic[name], num)
        assert err <= TOL, (name, err)


def tiny_input(seed=0, batch=2, length=5, d_input=2):
    return np.random.default_rng(seed).standard_normal((batch, length, d_input))


@pytest.mark.parametrize("norm, prenorm, residual",
                         list(itertools.product(["layer", "batch", None], [False, True], [True, False])))
def test_model_grads_every_block_variant(norm, prenorm, residual):
    model = S4DModel(2, 3, norm=norm, prenorm=prenorm, residual=residual, dropout=0.0, seed=1, **ONE_BLOCK)
    # training=True so BatchNorm uses (and differentiates through) batch statistics
    check_model_grads(model, tiny_input(), training=True)


@pytest.mark.parametrize("mode", ["conv", "recurrent"])
@pytest.mark.parametrize("pool", ["mean", "last"])
def test_model_grads_pools_and_modes(pool, mode):
    model = S4DModel(2, 3, pool=pool, mode=mode, dropout=0.0, seed=2, **TINY)
    check_model_grads(model, tiny_input(1), training=False)


@pytest.mark.parametrize("preset", ["s4d-example", "qs4d"])
def test_preset_grads_with_dropout_in_training(preset):
    model = S4DModel.from_preset(preset, 2, 3, dropout=0.3, seed=3, **TINY)
    x = tiny_input(2, batch=3)
    check_model_grads(model, x, training=True)
    # dropout really acts in training: two draws differ, eval is deterministic
    assert not np.allclose(model.forward(x, training=True), model.forward(x, training=True))
    np.testing.assert_array_equal(model.forward(x), model.forward(x))


@pytest.mark.parametrize("preset", ["s4d-example", "qs4d"])
def test_conv_and_recurrent_models_agree(preset):
    model = S4DModel.from_preset(preset, 2, 4, seed=4, **TINY)
    x = tiny_input(3, batch=3, length=40)
    y_conv = model.forward(x, mode="conv")
    g = np.random.default_rng(5).standard_normal(y_conv.shape)
    dx_conv = model.backward(g)
    grads_conv = {k: v.copy() for k, v in model.grads.items()}
    y_rec = model.forward(x, mode="recurrent")
    dx_rec = model.backward(g)
    assert np.max(np.abs(y_conv - y_rec)) <= 1e-10
    assert np.max(np.abs(dx_conv - dx_rec)) <= 1e-10
    for k, v in model.grads.items():
        assert grad_error(v, grads_conv[k]) <= 1e-9, k  # relative: gradients sum over time steps


def test_parameter_count_of_the_s4d_example():
    model = S4DModel.from_preset("s4d-example", 3, 10)
    H, M, layers = 128, 32, 4
    # per layer: log_dt H, log_A_real and A_imag H*M each, C H*M complex (2 reals), D H,
    # GLU linear H*2H + 2H, LayerNorm 2H; encoder 3*H + H; decoder H*10 + 10
    per_layer = H + 2 * H * M + 2 * H * M + H + (2 * H * H + 2 * H) + 2 * H
    assert model.num_params() == layers * per_layer + (3 * H + H) + (H * 10 + 10) == 201_482


def test_presets_build_the_published_architectures():
    ex = S4DModel.from_preset("s4d-example", 1, 10)
    q = S4DModel.from_preset("qs4d", 1, 10)
    for m in (ex, q):
        assert len(m.blocks) == 4 and m.params["layers.3.ssm.C"].shape == (128, 32)
        assert m.blocks[0].dropout.p == 0.1 and m.blocks[0].ssm.dropout.p == 0.1
    b_ex, b_q = ex.blocks[0], q.blocks[0]
    assert isinstance(b_ex.norm, LayerNorm) and b_ex.residual and not b_ex.prenorm
    assert isinstance(b_q.norm, BatchNorm) and not b_q.residual
    assert type(b_ex.ssm.activation).__name__ == "GELU" and b_q.ssm.activation is None
    n = np.arange(32)
    np.testing.assert_allclose(ex.params["layers.0.ssm.A_imag"][0], np.pi * n, rtol=1e-6)
    np.testing.assert_allclose(q.params["layers.0.ssm.A_imag"][0], np.pi * n / 4, rtol=1e-6)
    assert isinstance(ex.pool, type(q.pool)) and type(ex.pool).__name__ == "MeanPool"
    assert S4DModel.from_preset("qs4d", 1, 10, n_layers=2).config["n_layers"] == 2
    with pytest.raises(ValueError, match="preset must be one of"):
        S4DModel.from_preset("s5", 1, 10)


def test_param_groups_partition_and_ssm_names():
    model = S4DModel(2, 3, learn_B=True, seed=0, **TINY)
    main, ssm = model.param_groups()
    assert main["ssm"] is False and ssm["ssm"] is True
    assert sorted(main["names"] + ssm["names"]) == sorted(model.params)
    assert set(ssm["names"]) == {f"layers.{i}.ssm.{p}" for i in range(2)
                                 for p in ("log_dt", "log_A_real", "A_imag", "B")}
    assert "layers.0.ssm.C" in main["names"] and "layers.0.ssm.mixing.linear.weight" in main["names"]


def test_learned_quantizer_steps_form_a_group_without_weight_decay():
    from qs4d_np.quant import QuantConfig
    from qs4d_np.train.optim import AdamW

    model = S4DModel(2, 3, seed=0, quant=QuantConfig(all=16, scale_mode="learned"), **TINY)
    main, ssm, steps = model.param_groups()
    assert steps["weight_decay"] == 0.0 and steps["ssm"] is False
    assert steps["names"] and all(name.endswith(".step") and "quant_" in name for name in steps["names"])
    assert sorted(main["names"] + ssm["names"] + steps["names"]) == sorted(model.params)
    # with zero gradients only weight decay moves a parameter: the main group's weights shrink,
    # the steps do not
    opt = AdamW(model.params, model.param_groups(), lr=0.1, weight_decay=0.5)
    before = {k: v.copy() for k, v in model.params.items()}
    opt.step({k: np.zeros_like(v) for k, v in model.params.items()})
    for name in steps["names"]:
        np.testing.assert_array_equal(model.params[name], before[name])
    assert not np.array_equal(model.params["layers.0.ssm.C"], before["layers.0.ssm.C"])
    # a float model keeps its two groups
    assert len(S4DModel(2, 3, seed=0, **TINY).param_groups()) == 2


def test_seeded_construction_is_deterministic():
    a, b, c = (S4DModel(2, 3, seed=s, **TINY) for s in (7, 7, 8))
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert any(not np.array_equal(a.params[k], c.params[k]) for k in a.params)


def test_save_load_round_trip(tmp_path):
    model = S4DModel.from_preset("qs4d", 2, 3, seed=5, **TINY)
    x = tiny_input(4, batch=3)
    model.forward(x, training=True)  # moves the BatchNorm running statistics off their init
    path = tmp_path / "ckpt" / "model"
    model.save(path)
    meta = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    assert meta["format_version"] == 1 and meta["config"]["norm"] == "batch"
    back = S4DModel.load(path)
    assert back.config == model.config
    for k, v in model.state_arrays().items():
        np.testing.assert_array_equal(back.state_arrays()[k], v)
        assert back.state_arrays()[k].dtype == v.dtype
    assert "buffers/layers.0.norm.running_mean" in model.state_arrays()
    np.testing.assert_array_equal(back.forward(x), model.forward(x))
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".tmp")]


def test_load_names_the_mismatched_key(tmp_path):
    small = S4DModel(2, 3, seed=0, **TINY)
    small.save(tmp_path / "m")
    arrays = dict(np.load(tmp_path / "m.npz", allow_pickle=False))
    arrays["params/decoder.weight"] = np.zeros((3, 4))
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(ValueError, match=r"'params/decoder.weight' has shape \(3, 4\), expected \(3, 3\)"):
        S4DModel.load(tmp_path / "m")
    del arrays["params/decoder.weight"]
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(ValueError, match="missing array 'params/decoder.weight'"):
        S4DModel.load(tmp_path / "m")
    arrays["params/decoder.weight"] = np.zeros((3, 3))
    arrays["params/extra"] = np.zeros(2)
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(ValueError, match="unexpected array 'params/extra'"):
        S4DModel.load(tmp_path / "m")
    np.savez(tmp_path / "m.npz", **{**arrays, "params/extra": np.array([object()])})
    with pytest.raises(ValueError, match="pickle-free"):
        S4DModel.load(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        S4DModel.load(tmp_path / "nothing")


def test_bad_input_is_named():
    model = S4DModel(2, 3, seed=0, **TINY)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, length, 2\), got \(2, 5, 3\)"):
        model.forward(np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        model.forward(np.zeros((5, 2)))
    bad = tiny_input()
    bad[0, 1, 0] = np.inf
    with pytest.raises(ValueError, match="x contains 1 non-finite"):
        model.forward(bad)
    with pytest.raises(ValueError, match="mode must be one of"):
        model.forward(tiny_input(), mode="fft")
    with pytest.raises(ValueError, match="norm must be one of"):
        S4DModel(2, 3, norm="group", **TINY)
    with pytest.raises(ValueError, match="pool must be one of"):
        S4DModel(2, 3, pool="max", **TINY)
    with pytest.raises(ValueError, match="d_input must be >= 1"):
        S4DModel(0, 3, **TINY)
    model.forward(tiny_input())
    with pytest.raises(ValueError, match=r"dlogits must have shape \(2, 3\)"):
        model.backward(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        SoftmaxCrossEntropy().forward(model.forward(tiny_input()), np.array([0, 3]))
    with pytest.raises(RuntimeError, match="before forward"):
        S4DModel(2, 3, **TINY).backward(np.zeros((2, 3)))
