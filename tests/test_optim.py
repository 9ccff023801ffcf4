"""AdamW (decoupled weight decay, bias correction, groups, complex pairs) and clipping."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qs4d_np.train.optim import AdamW, GroupRule, clip_grad_norm, global_grad_norm


def _adamw_scalar(p, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """Scalar AdamW written out step by step from the torch.optim.AdamW docs."""
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p = p - lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


def test_two_steps_match_hand_computation():
    p0 = np.array([0.5, -1.25, 3.0])
    g1 = np.array([0.1, -0.4, 2.0])
    g2 = np.array([-0.3, 0.05, 1.0])
    params = {"w": p0.copy()}
    opt = AdamW(params, lr=0.01, weight_decay=0.05)
    opt.step({"w": g1})
    opt.step({"w": g2})
    expected = [_adamw_scalar(p0[i], [g1[i], g2[i]], 0.01, 0.05) for i in range(3)]
    # float64 throughout: agreement to rounding (a few ulps of values ~1)
    np.testing.assert_allclose(params["w"], expected, rtol=0, atol=1e-14)
    # the first step of Adam moves each entry by ~lr (m_hat/sqrt(v_hat) = sign(g)), so the
    # weight decay and bias correction are really exercised: check against a wd=0 run
    no_wd = [_adamw_scalar(p0[i], [g1[i], g2[i]], 0.01, 0.0) for i in range(3)]
    assert np.max(np.abs(np.array(expected) - no_wd)) > 1e-4


def test_params_updated_in_place():
    w = np.ones(4, dtype=np.float32)
    opt = AdamW({"w": w}, lr=0.1, weight_decay=0.0)
    opt.step({"w": np.ones(4, dtype=np.float32)})
    assert w.dtype == np.float32 and np.all(w < 1.0)


def test_complex_equals_stacked_real_pairs():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(3, 4)) + 1j * rng.normal(size=(3, 4))
    pairs = np.stack([c.real, c.imag], axis=-1)  # (3, 4, 2): the same memory order as the float view
    cparams, rparams = {"C": c.copy()}, {"C": pairs.copy()}
    copt = AdamW(cparams, lr=0.01, weight_decay=0.1)
    ropt = AdamW(rparams, lr=0.01, weight_decay=0.1)
    for _ in range(3):
        gc = rng.normal(size=(3, 4)) + 1j * rng.normal(size=(3, 4))
        copt.step({"C": gc})
        ropt.step({"C": np.stack([gc.real, gc.imag], axis=-1)})
    np.testing.assert_array_equal(np.stack([cparams["C"].real, cparams["C"].imag], -1), rparams["C"])
    # per-component second moment: the imaginary parts' v differ from the real parts'
    v = copt.v["C"].reshape(3, 4, 2)
    assert not np.allclose(v[..., 0], v[..., 1])


def test_groups_get_their_own_lr_and_weight_decay():
    params = {"C": np.ones(2), "log_dt": np.ones(2), "D": np.ones(2)}
    groups = [{"names": ["C"], "ssm": False}, {"names": ["log_dt"], "ssm": True},
              {"names": ["D"], "lr": 0.5, "weight_decay": 0.0}]
    opt = AdamW(params, groups, lr=0.01, weight_decay=0.05)
    assert [(g["base_lr"], g["weight_decay"]) for g in opt.groups] == [(0.01, 0.05), (0.001, 0.0), (0.5, 0.0)]
    grads = {k: np.full(2, 0.2) for k in params}
    opt.step(grads)
    assert params["C"][0] == pytest.approx(_adamw_scalar(1.0, [0.2], 0.01, 0.05), abs=1e-15)
    assert params["log_dt"][0] == pytest.approx(_adamw_scalar(1.0, [0.2], 0.001, 0.0), abs=1e-15)
    assert params["D"][0] == pytest.approx(_adamw_scalar(1.0, [0.2], 0.5, 0.0), abs=1e-15)
    # the cap is min(0.001, lr): a smaller base lr is kept; the rule is configurable
    small = AdamW({"a": np.ones(1)}, [{"names": ["a"], "ssm": True}], lr=1e-4, weight_decay=0.0)
    assert small.groups[0]["base_lr"] == 1e-4
    uncapped = AdamW({"a": np.ones(1)}, [{"names": ["a"], "ssm": True}], lr=0.01, weight_decay=0.1,
                     rule=GroupRule(ssm_lr_cap=None, ssm_weight_decay=0.1))
    assert (uncapped.groups[0]["base_lr"], uncapped.groups[0]["weight_decay"]) == (0.01, 0.1)


def test_lr_factor_scales_every_group():
    params = {"a": np.ones(1), "b": np.ones(1)}
    opt = AdamW(params, [{"names": ["a"]}, {"names": ["b"], "ssm": True}], lr=0.01, weight_decay=0.0)
    opt.set_lr_factor(0.5)
    assert opt.group_lrs() == [0.005, 0.0005]
    opt.step({"a": np.ones(1), "b": np.ones(1)})
    assert params["a"][0] == pytest.approx(_adamw_scalar(1.0, [1.0], 0.005, 0.0), abs=1e-15)


def test_bad_groups_and_grads_are_clear():
    params = {"a": np.ones(2), "b": np.ones(2)}
    with pytest.raises(ValueError, match="'b'.* in no group"):
        AdamW(params, [{"names": ["a"]}], lr=0.01, weight_decay=0.0)
    with pytest.raises(ValueError, match="'a' is in groups\\[0\\] and groups\\[1\\]"):
        AdamW(params, [{"names": ["a", "b"]}, {"names": ["a"]}], lr=0.01, weight_decay=0.0)
    with pytest.raises(ValueError, match="'zz', which is not in params"):
        AdamW(params, [{"names": ["a", "b", "zz"]}], lr=0.01, weight_decay=0.0)
    opt = AdamW(params, lr=0.01, weight_decay=0.0)
    with pytest.raises(KeyError, match="'b'"):
        opt.step({"a": np.ones(2)})
    with pytest.raises(ValueError, match="grads\\['b'\\] must match"):
        opt.step({"a": np.ones(2), "b": np.ones(3)})
    assert opt.step_count == 0 and np.all(params["a"] == 1.0)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        AdamW(params, lr=-1.0, weight_decay=0.0)


def test_state_roundtrip_continues_identically():
    rng = np.random.default_rng(1)
    grads = [{"w": rng.normal(size=5), "c": rng.normal(size=2) + 1j * rng.normal(size=2)} for _ in range(4)]
    init = {"w": rng.normal(size=5), "c": rng.normal(size=2) + 1j * rng.normal(size=2)}
    straight = {k: v.copy() for k, v in init.items()}
    opt = AdamW(straight, lr=0.01, weight_decay=0.01)
    for g in grads:
        opt.step(g)
    first = {k: v.copy() for k, v in init.items()}
    opt1 = AdamW(first, lr=0.01, weight_decay=0.01)
    for g in grads[:2]:
        opt1.step(g)
    resumed = {k: v.copy() for k, v in first.items()}
    opt2 = AdamW(resumed, lr=0.01, weight_decay=0.01)
    opt2.load_state(opt1.state_arrays(), opt1.state_meta())
    for g in grads[2:]:
        opt2.step(g)
    for k in init:
        np.testing.assert_array_equal(resumed[k], straight[k])
    bad = opt1.state_arrays()
    bad["m.w"] = np.zeros(4)
    with pytest.raises(ValueError, match="'m.w' is \\(4,\\)"):
        opt2.load_state(bad, opt1.state_meta())


def test_clip_grad_norm():
    grads = {"a": np.array([3.0, 0.0]), "c": np.array([4.0j])}  # complex counts as (0, 4): norm 5
    assert global_grad_norm(grads) == pytest.approx(5.0)
    norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(5.0)
    assert global_grad_norm(grads) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(grads["c"], [0.8j], rtol=1e-6)
    small = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(small, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(small["a"], [0.3, 0.4])  # below the bound: untouched
    bad = {"a": np.array([np.nan, 1.0])}
    assert math.isnan(clip_grad_norm(bad, 1.0))
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_grad_norm(small, 0.0)


@settings(max_examples=25, deadline=None)
@given(lr=st.floats(1e-4, 0.1), wd=st.floats(0.0, 0.5), b1=st.floats(0.0, 0.99), b2=st.floats(0.5, 0.9999),
       steps=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_matches_scalar_reference_for_random_hyperparameters(lr, wd, b1, b2, steps, seed):
    rng = np.random.default_rng(seed)
    p0 = rng.normal(size=3)
    grads = [rng.normal(size=3) for _ in range(steps)]
    params = {"w": p0.copy()}
    opt = AdamW(params, lr=lr, weight_decay=wd, betas=(b1, b2))
    for g in grads:
        opt.step({"w": g})
    expected = [_adamw_scalar(p0[i], [g[i] for g in grads], lr, wd, b1, b2) for i in range(3)]
    # float64 vector ops vs scalar ops in the same order: rounding-level agreement
    np.testing.assert_allclose(params["w"], expected, rtol=1e-12, atol=1e-12)
