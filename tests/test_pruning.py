"""Pruning: exact zeros, per-layer fractions, masks survive fine-tuning, greedy respects its budget."""
import json

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


# -- prune(): the reference's protocol ("qs4d"), the shared rule, the reports -------------------
from qs4d_np.hardware.pruning import QS4D_TENSORS, PruneResult, layer_report, prune, prune_qs4d  # noqa: E402
from qs4d_np.quant.config import QuantConfig  # noqa: E402


def _predictions(model, x, batch_size):
    return np.concatenate([np.argmax(model.forward(x[lo:lo + batch_size]), axis=1)
                           for lo in range(0, len(x), batch_size)])


def _oracle_qs4d(model, x, y, tensors, tolerance, batch_size, unit="row"):
    """The reference's loop written plainly: full evaluations, the documented order, no shortcuts."""
    H, params = model.config["d_model"], model.params
    saved = {k: v.copy() for k, v in params.items()}
    base = int(np.count_nonzero(_predictions(model, x, batch_size) == y))
    need = base - int(np.floor(tolerance * len(y) + 1e-9))
    order, zeroed, seen = [], [], []
    for layer in range(len(model.blocks)):
        for tensor in QS4D_TENSORS:
            name = f"layers.{layer}.ssm.{tensor}"
            if tensor not in tensors or name not in params:
                continue
            rows = unit == "row" and params[name].shape[0] == H
            for index in ([(h,) for h in range(H)] if rows else list(np.ndindex(*params[name].shape))):
                order.append((name, list(index)))
                value = params[name][index].copy()
                params[name][index] = 0
                right = _predictions(model, x, batch_size) == y
                # where the decision is certain: the first batch end with enough right, or too few left
                ends = np.arange(batch_size, len(y) + batch_size, batch_size).clip(max=len(y))
                so_far = np.cumsum(right)[ends - 1]
                certain = (so_far >= need) | (so_far + len(y) - ends < need)
                seen.append(int(ends[np.argmax(certain)]) if certain.any() else len(y))
                if np.count_nonzero(right) >= need:
                    zeroed.append((name, list(index)))
                else:
                    params[name][index] = value
    for k, v in params.items():
        v[...] = saved[k]
    return order, zeroed, seen


@pytest.mark.parametrize("kind, tolerance, batch", [("float-conv", 0.0, 8), ("qat-recurrent", 0.0, 8),
                                                   ("float-conv", 0.3, 8), ("float-conv", 0.3, 1)])
def test_qs4d_equals_the_plain_reference_loop(kind, tolerance, batch):
    # the incremental, early-stopping evaluation must take every decision a full evaluation takes;
    # the quantized recurrent model (per-batch activation ranges) is the delicate case
    extra = {} if kind == "float-conv" else dict(quant=QuantConfig(16, state=2 ** 8), mode="recurrent")
    model = S4DModel(2, 3, seed=11, d_model=4, d_state=4, n_layers=2, dropout=0.0, **extra)
    x, _ = _data(n=30, length=10, seed=3)
    rng = np.random.default_rng(4)
    y = _predictions(model, x, batch)
    flip = rng.random(30) < 0.2  # some labels wrong, so that zeros can also help
    y[flip] = (y[flip] + 1) % 3
    tensors = ("D", "C", "log_A_real", "mixing.linear.bias")
    # small tolerances: with this random model, larger ones keep nearly every zero
    order, zeroed, seen = _oracle_qs4d(model, x, y, tensors, tolerance, batch)
    masks, record = prune_qs4d(model, x, y, tolerance=tolerance, tensors=tensors, batch_size=batch)
    assert [(t["tensor"], t["index"]) for t in record["tries"]] == order
    assert [(t["tensor"], t["index"]) for t in record["tries"] if t["kept"]] == zeroed
    assert [t["seen"] for t in record["tries"]] == seen  # each try stopped as soon as it was decided
    if tolerance == 0.0:
        assert 0 < len(zeroed) < len(order)  # the case decides both ways
    else:
        assert any(s < 30 for s, t in zip(seen, record["tries"]) if t["kept"])  # and keeps come early too
    assert record["evaluations"] == len(order) + 2  # the base, one per unit, the final model
    assert any(t["seen"] < 30 for t in record["tries"])  # decisions did come early
    for name, keep in masks.masks.items():
        expect = np.ones_like(keep)
        for n, index in zeroed:
            if n == name:
                expect[tuple(index)] = False
        assert np.array_equal(keep, expect), name


def test_qs4d_order_is_the_documented_one_and_deterministic():
    model = S4DModel(2, 3, seed=2, d_model=4, d_state=4, n_layers=2, dropout=0.0)
    x, y = _data(n=12, length=6)
    tensors = ("mixing.linear.bias", "log_dt", "C", "D")  # the order given does not matter
    masks, record = prune_qs4d(model, x, y, tolerance=0.2, tensors=tensors, batch_size=5)
    expect = []
    for layer in (0, 1):
        expect += [(f"layers.{layer}.ssm.D", [h]) for h in range(4)]
        expect += [(f"layers.{layer}.ssm.C", [h]) for h in range(4)]
        expect += [(f"layers.{layer}.ssm.log_dt", [h]) for h in range(4)]
        expect += [(f"layers.{layer}.ssm.mixing.linear.bias", [k]) for k in range(8)]  # no channel axis
    assert [(t["tensor"], t["index"]) for t in record["tries"]] == expect
    again_masks, again = prune_qs4d(model, x, y, tolerance=0.2, tensors=tensors, batch_size=5)
    assert again["tries"] == record["tries"]
    assert all(np.array_equal(again_masks.masks[k], v) for k, v in masks.masks.items())
    _, elements = prune_qs4d(model, x, y, tolerance=0.2, tensors=("C",), unit="element", batch_size=5)
    assert [t["index"] for t in elements["tries"][:5]] == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0]]  # row-major


def _one_channel_model(h0):
    """A 1-layer model whose mixing sees only channel h0: every other C row cannot matter, and with
    D = 0 and no biases, zeroing kernel h0 makes every logit 0 (every prediction class 0)."""
    model = S4DModel(2, 3, seed=7, d_model=6, d_state=8, n_layers=1, dropout=0.0, dtype=np.float64, norm=None,
                     residual=False)
    params = model.params
    params["layers.0.ssm.mixing.linear.weight"][np.arange(6) != h0] = 0.0
    for name in ("layers.0.ssm.D", "layers.0.ssm.mixing.linear.bias", "decoder.bias"):
        params[name][:] = 0.0
    return model


@pytest.mark.parametrize("h0", [0, 3, 5])
def test_qs4d_keeps_what_cannot_matter_and_restores_what_must(h0):
    model = _one_channel_model(h0)
    x, _ = _data(n=40, length=16, seed=5)
    y = _predictions(model, x, 40)  # base accuracy 100%
    C = model.params["layers.0.ssm.C"]
    saved = C[h0].copy()
    C[h0] = 0
    changed = int(np.count_nonzero(_predictions(model, x, 40) != y))  # what zeroing kernel h0 costs
    C[h0] = saved
    assert changed >= 2, "the test needs a kernel that matters"
    for tolerance, h0_kept in ((changed / 40, True), ((changed - 1) / 40, False)):
        result = prune(model, x, y, "qs4d", tolerance=tolerance, batch_size=16)
        keep = result.masks.masks["layers.0.ssm.C"]
        assert not keep[np.arange(6) != h0].any()  # the kernels nothing reads are all zeroed
        assert keep[h0].all() != h0_kept, (tolerance, changed)
        assert result.base_accuracy == 1.0
        assert result.accuracy == pytest.approx(1.0 - changed / 40 if h0_kept else 1.0)
        assert result.layers[0]["kernels_pruned"] == 5 + h0_kept
    assert np.array_equal(model.params["layers.0.ssm.C"][h0], saved)  # the model is left unchanged


def test_reported_fractions_are_multiples_of_one_over_H_and_agree_with_the_masks():
    model = S4DModel(2, 3, seed=8, d_model=8, d_state=8, n_layers=2, dropout=0.0)
    x, y = _data(n=20, length=8, seed=6)
    result = prune(model, x, y, "qs4d", tolerance=0.05, tensors=("C", "D", "mixing.linear.weight"), batch_size=10)
    assert isinstance(result, PruneResult) and result.samples == 20 and result.mode == "conv"
    for entry in result.layers:
        assert entry["H"] == 8
        assert entry["kernel_fraction"] * 8 == entry["kernels_pruned"]
        for tensor, t in entry["tensors"].items():
            assert float(t["row_fraction"] * 8).is_integer(), tensor
            assert t["pruned"] == t["rows_pruned"] * (t["elements"] // 8), tensor  # whole rows only
        keep = result.masks.masks[f"{entry['layer']}.ssm.C"]
        assert entry["kernels_pruned"] == int(np.count_nonzero(~keep.any(axis=1)))
    assert result.masks.fractions() == {e["layer"]: sum(t["rows_pruned"] for t in e["tensors"].values()) / 24
                                        for e in result.layers}
    json.dumps(result.to_dict())  # JSON-ready
    # element units: a kernel counts as pruned only when every one of its modes is
    masks = PruneMasks("mode", {"layers.0.ssm.C": np.ones((8, 4), bool), "layers.1.ssm.C": np.ones((8, 4), bool)})
    masks.masks["layers.0.ssm.C"][2] = False
    masks.masks["layers.0.ssm.C"][5, :3] = False
    report = layer_report(model, masks)
    assert report[0]["kernels_pruned"] == 1 and report[0]["tensors"]["ssm.C"]["pruned"] == 7
    assert report[1]["kernels_pruned"] == 0


def test_qs4d_zeros_stay_exact_through_fine_tuning():
    model = _model(seed=9)
    x, y = _data(n=24, seed=7)
    result = prune(model, x, y, "qs4d", tolerance=0.0, tensors=("C", "log_A_real", "D"), batch_size=12)
    assert any((~k).any() and k.any() for k in result.masks.masks.values())  # some zeroed, some trained
    wrapped = result.masked(model)
    opt = AdamW(model.params, model.param_groups(), lr=0.05, weight_decay=0.1, rule=GroupRule(ssm_lr_cap=None))
    loss_fn = SoftmaxCrossEntropy()
    before = {k: v.copy() for k, v in model.params.items()}
    for _ in range(2):
        loss_fn.forward(wrapped.forward(x, training=True), y)
        wrapped.backward(loss_fn.backward())
        opt.step(model.grads)
    for name, keep in result.masks.masks.items():
        assert np.all(model.params[name][~keep] == 0), name
        if keep.any():  # the rest did train
            assert not np.array_equal(model.params[name][keep], before[name][keep]), name


@pytest.mark.parametrize("method", ["modes", "channels", "magnitude"])
def test_prune_runs_every_method_under_the_same_rule(method):
    model = _model(seed=10)
    x, y = _data(n=30, seed=8)
    kw = {"sparsity": 0.5} if method == "magnitude" else {"chunk": 0.25}
    result = prune(model, x, y, method, tolerance=0.1, batch_size=16, **kw)
    result.apply(model)
    acc = float(np.mean(_predictions(model, x, 16) == y))
    assert result.accuracy == pytest.approx(acc)
    if method != "magnitude":
        assert acc >= result.base_accuracy - 0.1
    else:
        assert result.masks.sparsity == 0.5 and result.tolerance is None


def test_forward_from_forward_to_is_forward_bit_for_bit():
    for extra in ({}, dict(quant=QuantConfig(16, state=2 ** 8), mode="recurrent")):
        model = S4DModel(2, 3, seed=12, d_model=4, d_state=4, n_layers=3, dropout=0.0, **extra)
        x, _ = _data(n=5, length=7)
        full = model.forward(x)
        for k in range(4):
            assert np.array_equal(model.forward_from(model.forward_to(x, k), k), full), (extra, k)
    with pytest.raises(ValueError, match="layer must be <= 3"):
        model.forward_to(x, 4)
    with pytest.raises(ValueError, match=r"h must have shape \(batch, length, 4\)"):
        model.forward_from(x, 0)


def test_prune_bad_input_is_named():
    model = _model()
    x, y = _data()
    with pytest.raises(ValueError, match="method must be one of"):
        prune(model, x, y, "random")
    with pytest.raises(ValueError, match="tolerance must be >= 0.0"):
        prune(model, x, y, "qs4d", tolerance=-0.01)
    with pytest.raises(ValueError, match="magnitude' needs sparsity"):
        prune(model, x, y, "magnitude")
    with pytest.raises(ValueError, match="sparsity must be <= 1.0"):
        prune(model, x, y, "magnitude", sparsity=1.5)
    with pytest.raises(ValueError, match="tensors: 'Bbar' is not a tensor of this model"):
        prune(model, x, y, "qs4d", tensors=("C", "Bbar"))
    with pytest.raises(ValueError, match="unit must be one of"):
        prune(model, x, y, "qs4d", unit="kernel")
    with pytest.raises(ValueError, match=r"y_val must hold labels in 0..2"):
        prune(model, x, y + 3, "qs4d")


def test_the_rule_counts_samples_without_float_ties():
    from qs4d_np.hardware.pruning_search import _min_correct
    # 0.29 * 100 is 28.999999999999996 in floats, 0.07 * 100 is 7.000000000000001: both mean 29 / 7 samples
    assert _min_correct(100, 100, 0.29) == 71
    assert _min_correct(90, 100, 0.07) == 83
    assert _min_correct(395, 400, 0.01) == 391  # the paper's 1 point on 400 validation digits
    assert _min_correct(40, 41, 0.0) == 40
