"""Pruning: exact zeros, per-layer fractions, masks survive fine-tuning, greedy respects its budget."""
import numpy as np
import pytest

from qs4d_np.core.loss import SoftmaxCrossEntropy
from qs4d_np.hardware.imssa import mapping_counts
from qs4d_np.hardware.config import CrossbarConfig
from qs4d_np.hardware.pruning import MaskedModel, PruneMasks, mode_scores, prune_greedy, prune_magnitude
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.train.optim import AdamW, GroupRule

TINY = dict(d_model=8, d_state=16, n_layers=2, dropout=0.0)


def _model(seed=0, **kw):
    return S4DModel(2, 3, seed=seed, **{**TINY, **kw})


def _data(n=24, length=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, length, 2)).astype(np.float32), rng.integers(0, 3, n)


def test_mode_scores_rank_by_kernel_norm():
    model = S4DModel(2, 3, dtype=np.float64, seed=1, **TINY)
    ssm = model.blocks[0].ssm
    scores = mode_scores(ssm)
    d = ssm.discrete()
    # the score is the l2 norm of the mode's complex impulse response C*Bbar*Abar^l over l >= 0
    l = np.arange(20000)
    h, m = 3, 2
    direct = np.sqrt(np.sum(np.abs(ssm.params["C"][h, m] * d.Bbar[h, m] * d.Abar[h, m] ** l) ** 2))
    np.testing.assert_allclose(scores[h, m], direct, rtol=1e-6)


@pytest.mark.parametrize("granularity", ["mode", "channel", "weight"])
def test_magnitude_fractions_and_exact_zeros(granularity):
    model = _model()
    masks = prune_magnitude(model, 0.25, granularity)
    masks.apply(model)
    fr = masks.fractions()
    assert all(v == 0.25 for v in fr.values()), fr  # 8 channels, 64 modes, 16x8 weights: all divisible by 4
    for name, keep in masks.masks.items():
        assert np.all(model.params[name][~keep] == 0)
    if granularity == "mode":
        assert set(fr) == {"layers.0", "layers.1"}
        assert np.count_nonzero(model.params["layers.0.ssm.C"] == 0) == 16
    if granularity == "channel":
        C, D = model.params["layers.1.ssm.C"], model.params["layers.1.ssm.D"]
        W = model.params["layers.1.ssm.mixing.linear.weight"]
        gone = np.flatnonzero(D == 0)
        assert len(gone) == 2 and np.all(C[gone] == 0) and np.all(W[gone] == 0)
    if granularity == "weight":
        assert "encoder.weight" in fr and "layers.0.ssm.mixing.linear.weight" in fr


def test_magnitude_prunes_the_lowest_scores_first():
    model = _model(seed=2)
    masks = prune_magnitude(model, 0.5, "mode")
    scores = mode_scores(model.blocks[0].ssm).reshape(-1)
    keep = masks.masks["layers.0.ssm.C"].reshape(-1)
    assert scores[~keep].max() <= scores[keep].min()


def test_pruned_channel_output_is_zero_and_mapping_shrinks():
    model = S4DModel(2, 3, seed=3, dtype=np.float64, **TINY)
    full = mapping_counts(model, CrossbarConfig(), 12)["adc_conversions_per_sample"]
    masks = prune_magnitude(model, 0.25, "channel")
    masks.apply(model)
    # the pruned channels' SSM outputs (before activation and mixing) are exactly zero
    ssm = model.blocks[0].ssm
    gone = np.flatnonzero(~masks.masks["layers.0.ssm.D"])
    x, _ = _data()
    u = np.random.default_rng(0).standard_normal((2, 12, 8))
    saved = (ssm.activation, ssm.mixing)
    ssm.activation = ssm.mixing = None
    try:
        y = ssm.forward(u, mode="recurrent")
    finally:
        ssm.activation, ssm.mixing = saved
    assert np.all(y[:, :, gone] == 0)
    pruned = mapping_counts(model, CrossbarConfig(), 12)["adc_conversions_per_sample"]
    assert full - pruned == 12 * 2 * 2 * (16 + 1)  # 2 layers x 2 channels x (N + 1) readouts per step


def test_masked_model_keeps_pruned_parts_zero_through_training():
    model = _model(seed=4)
    masks = prune_magnitude(model, 0.5, "channel")
    wrapped = MaskedModel(model, masks)
    opt = AdamW(model.params, model.param_groups(), lr=0.01, weight_decay=0.01, rule=GroupRule(ssm_lr_cap=0.001))
    loss_fn = SoftmaxCrossEntropy()
    x, y = _data()
    for _ in range(3):
        logits = wrapped.forward(x, training=True)
        loss_fn.forward(logits, y)
        wrapped.backward(loss_fn.backward())
        opt.step(model.grads)
    for name, keep in masks.masks.items():
        assert np.all(model.params[name][~keep] == 0), name
        assert not np.all(model.params[name][keep] == 0)
    assert wrapped.config is model.config  # everything else is the model's


def test_greedy_respects_the_tolerance_and_restores_the_model():
    model = _model(seed=5)
    x, y = _data(n=30, seed=1)
    before = {k: v.copy() for k, v in model.params.items()}
    masks, record = prune_greedy(model, x, y, tolerance=0.1, granularity="mode", chunk=0.25, batch_size=16)
    for k, v in model.params.items():
        assert np.array_equal(v, before[k])
    assert record["accuracy"] >= record["base_accuracy"] - 0.1
    masks.apply(model)
    logits = model.forward(x)
    assert np.mean(np.argmax(logits, axis=1) == y) == pytest.approx(record["accuracy"])
    assert set(masks.fractions()) == {"layers.0", "layers.1"}
    assert all(f in (0.0, 0.25, 0.5, 0.75, 1.0) for f in masks.fractions().values())
    last = {s["group"]: s["pruned"] for s in record["steps"]}  # a group's last accepted step is its total
    assert masks.pruned == {g: last.get(g, 0) for g in ("layers.0", "layers.1")}


def test_greedy_zero_tolerance_with_unit_chunks_never_loses_accuracy():
    model = _model(seed=6)
    x, y = _data(n=20, seed=2)
    masks, record = prune_greedy(model, x, y, tolerance=0.0, granularity="channel", chunk=1 / 8, batch_size=20)
    assert record["accuracy"] >= record["base_accuracy"]
    assert record["evaluations"] >= 1 + 2  # the base and at least one try per layer


def test_bad_input_is_named():
    model = _model()
    x, y = _data()
    with pytest.raises(ValueError, match="sparsity must be <= 1.0, got 1.5"):
        prune_magnitude(model, 1.5)
    with pytest.raises(ValueError, match="granularity must be one of"):
        prune_magnitude(model, 0.5, "block")
    with pytest.raises(ValueError, match="tolerance must be >= 0.0"):
        prune_greedy(model, x, y, tolerance=-0.1)
    with pytest.raises(ValueError, match="chunk must be > 0.0"):
        prune_greedy(model, x, y, chunk=0.0)
    with pytest.raises(ValueError, match=r"y_val must have shape \(24,\)"):
        prune_greedy(model, x, y[:3])
    with pytest.raises(TypeError, match="model must be an S4DModel"):
        prune_magnitude(object(), 0.5)
    with pytest.raises(TypeError, match="masks must be PruneMasks"):
        MaskedModel(model, {})
    with pytest.raises(ValueError, match="mask 'nope' names no parameter"):
        PruneMasks("mode", {"nope": np.ones(3, bool)}).apply(model)


@pytest.mark.parametrize("granularity", ["mode", "channel", "weight"])
def test_masked_model_backward_matches_fd_of_the_masked_model(granularity):
    # the wrapped model computes f(params * mask) (its forward re-applies the masks), so
    # dL/dparam is the model's gradient on kept entries and exactly 0 on pruned ones
    from reference.gradcheck import grad_error, numerical_grad
    model = S4DModel(2, 3, dtype=np.float64, seed=5, **{**TINY, "d_model": 4, "d_state": 4, "n_layers": 1})
    masks = prune_magnitude(model, 0.5, granularity)
    wrapped = MaskedModel(model, masks)
    x = _data(n=3, length=6)[0].astype(np.float64)
    w = np.random.default_rng(1).standard_normal((3, 3))

    def loss():
        return float(np.sum(w * wrapped.forward(x, training=True)))
    loss()
    wrapped.backward(w)
    grads = {k: v.copy() for k, v in model.grads.items()}
    assert any((~keep).any() for keep in masks.masks.values())
    for name, param in model.params.items():
        # eps 3e-5 as in tests/test_model.py: some SSM gradients are ~1e-5 of the loss, where
        # eps 1e-6 leaves ~1e-6 relative rounding noise in the differences
        numeric = numerical_grad(loss, param, eps=3e-5)
        assert grad_error(grads[name], numeric) <= 1e-6, name
        if name in masks.masks:
            assert np.all(grads[name][~masks.masks[name]] == 0), name
