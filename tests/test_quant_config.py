"""QuantConfig: override semantics, reference flags, per-layer values, JSON round trip, validation."""
import json

import numpy as np
import pytest

from qs4d_np.io import atomic_write_json, load_json
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.config import TARGETS, QuantConfig, TargetOptions
from qs4d_np.quant.quantizer import Quantizer
from qs4d_np.ssm.s4d import S4D


def test_specific_target_overrides_all():
    cfg = QuantConfig(all=64, A=16, C="float")
    assert cfg.levels_for("A") == 16
    assert cfg.levels_for("C") is None  # explicitly float despite all
    assert all(cfg.levels_for(t) == 64 for t in TARGETS if t not in ("A", "C"))
    assert QuantConfig().is_float and all(QuantConfig().levels_for(t) is None for t in TARGETS)
    assert QuantConfig(B=8).levels_for("A") is None and not QuantConfig(B=8).is_float


def test_from_reference_flags():
    cfg = QuantConfig.from_flags(all_quant=256, A_quant=16, dt_quant=None, state_quant=64)
    assert (cfg.levels_for("A"), cfg.levels_for("dt"), cfg.levels_for("state"), cfg.levels_for("coder")) == (16, 256, 64, 256)
    assert QuantConfig.from_flags(C_quant=4) == QuantConfig(C=4)
    with pytest.raises(ValueError, match="unknown quantization flag 'E_quant'"):
        QuantConfig.from_flags(E_quant=4)
    with pytest.raises(ValueError, match="unknown quantization flag 'lr'"):
        QuantConfig.from_flags(lr=0.01)


def test_from_flags_default_grid_is_narrow_and_qs4d_gives_the_reference_codes():
    x = np.linspace(-1.0, 1.0, 33)
    ours = QuantConfig.from_flags(C_quant=16).spec_for("C").forward(x, want_codes=True)[1].tensor()
    ref = QuantConfig.from_flags(C_quant=16, grid="qs4d").spec_for("C").forward(x, want_codes=True)[1].tensor()
    assert (ours.q.min(), ours.q.max()) == (-7, 7)  # narrow: 15 levels, a 4-bit word
    assert (ref.q.min(), ref.q.max()) == (-8, 8)    # the reference: 17 levels
    assert QuantConfig.from_flags(C_quant=16, grid="qs4d") == QuantConfig(C=16, grid="qs4d")
    with pytest.raises(ValueError, match=r"options\['grid'\] must be one of"):
        QuantConfig.from_flags(C_quant=16, grid="reference")


def test_per_layer_values():
    cfg = QuantConfig(all=[64, 32, 16], A={0: 8, 2: "float"})
    assert [cfg.levels_for("A", layer=i) for i in range(3)] == [8, 32, None]  # layer 1 falls back to all
    assert [cfg.levels_for("C", layer=i) for i in range(3)] == [64, 32, 16]
    with pytest.raises(ValueError, match="all has levels for 3 layers, got layer=3"):
        cfg.levels_for("C", layer=3)
    with pytest.raises(ValueError, match="A has per-layer levels"):
        cfg.levels_for("A")


def test_json_round_trip(tmp_path):
    cfg = QuantConfig(all=64, A={0: 8, 3: 16}, linear=[4, "float"], grid="qs4d", per_channel=True,
                      target_options={"act": {"scale_mode": "running"}, "state": {"power_of_two": True}})
    atomic_write_json(tmp_path / "q.json", cfg.to_dict())
    back = QuantConfig.from_dict(load_json(tmp_path / "q.json"))
    assert back == cfg
    assert back.levels_for("A", layer=3) == 16 and back.levels_for("linear", layer=1) is None
    assert json.loads(json.dumps(back.to_dict())) == json.loads(json.dumps(cfg.to_dict()))
    with pytest.raises(ValueError, match="QuantConfig dict must have keys"):
        QuantConfig.from_dict({"all": 4})


def test_options_reach_specs_and_quantizers():
    cfg = QuantConfig(all=16, grid="full", per_channel=True, target_options={"act": {"scale_mode": "running",
                                                                                     "per_channel": False}})
    spec = cfg.spec_for("C", axis=0)
    assert (spec.levels, spec.grid, spec.axis, spec.bits) == (16, "full", 0, 4)
    q = cfg.quantizer_for("act", layer=2, dtype=np.float64)
    assert isinstance(q, Quantizer) and q.scale_mode == "running" and q.spec.axis is None and q.name == "act[2]"
    assert QuantConfig(A=4).quantizer_for("C") is None
    bits = QuantConfig(all=256, A=16, C="float", target_options={"state": {"grid": "qs4d"}})
    assert (bits.bits_for("A"), bits.bits_for("dt"), bits.bits_for("state"), bits.bits_for("C")) == (4, 8, 9, None)


def test_validation_names_the_problem():
    with pytest.raises(ValueError, match="unknown quantization target or option.*'E'"):
        QuantConfig(E=4)
    with pytest.raises(ValueError, match="A must be >= 2, got 1"):
        QuantConfig(A=1)
    with pytest.raises(TypeError, match="C must be an integer"):
        QuantConfig(C=4.5)
    with pytest.raises(ValueError, match=r"A\[1\] must be >= 2"):
        QuantConfig(A=[4, 0])
    with pytest.raises(ValueError, match="must be an int >= 2, None or 'float'"):
        QuantConfig(dt="fp32")
    with pytest.raises(ValueError, match="rounding.* must be one of"):
        QuantConfig(all=4, rounding="nearest")
    with pytest.raises(TypeError, match=r"options\['symmetric'\] must be True or False, got 1"):
        QuantConfig(all=4, symmetric=1)
    with pytest.raises(TypeError, match=r"target_options\['act'\]\['per_channel'\] must be True or False, got 0"):
        QuantConfig(target_options={"act": {"per_channel": 0}})
    with pytest.raises(ValueError, match="target_options key must be one of"):
        QuantConfig(target_options={"mixing": {}})
    with pytest.raises(ValueError, match="unknown quantization option 'axis'"):
        QuantConfig(target_options={"act": {"axis": 1}})
    with pytest.raises(ValueError, match="target must be one of"):
        QuantConfig(all=4).levels_for("E")


def test_abar_bound_option_defaults_round_trips_and_reaches_the_abar_quantizer(tmp_path):
    cfg = QuantConfig(all=16, per_channel=True)
    assert cfg.options_for("A")["abar_bound"] is True
    off = QuantConfig(all=16, target_options={"A": {"abar_bound": False}})
    assert off.options_for("A")["abar_bound"] is False and off.options_for("C")["abar_bound"] is True
    for c in (cfg, off, QuantConfig(all=8, abar_bound=False)):
        atomic_write_json(tmp_path / "q.json", c.to_dict())
        assert QuantConfig.from_dict(load_json(tmp_path / "q.json")) == c
    # a dict saved before the option existed loads unbounded: the checkpoint computes what it computed
    old = cfg.to_dict()
    del old["options"]["abar_bound"]
    back = QuantConfig.from_dict(json.loads(json.dumps(old)))
    assert back.options_for("A")["abar_bound"] is False and back == QuantConfig(all=16, per_channel=True,
                                                                                abar_bound=False)
    with pytest.raises(TypeError, match=r"options\['abar_bound'\] must be True or False, got 1"):
        QuantConfig(all=4, abar_bound=1)
    # the S4D wiring's call: the A target's quantizer of Abar with the unit-disk bound
    q = cfg.quantizer_for("A", 0, axis=0, n_scales=8, dtype=np.float32, max_modulus=1.0)
    assert q.spec.max_modulus == 1.0 and q.spec.axis == 0 and q.spec.complex_mode == "cartesian"
    assert cfg.quantizer_for("A", 0, axis=0, n_scales=8).spec.max_modulus is None
    Abar = (0.99 * np.exp(1j * np.linspace(0.1, 1.5, 8))).astype(np.complex64).reshape(4, 2)
    assert (np.abs(q.forward(Abar).astype(np.complex128)) <= 1.0).all()


def test_fixed_range_per_target():
    cfg = QuantConfig(all=16, target_options={"state": {"scale_mode": "fixed", "fixed_range": 4.0},
                                              "C": {"scale_mode": "fixed", "fixed_range": [1.0, 2.0]}})
    assert cfg.quantizer_for("state").fixed_range == 4.0
    assert cfg.quantizer_for("C", axis=0).fixed_range == [1.0, 2.0]  # one range per channel
    assert cfg.quantizer_for("D").fixed_range is None and cfg.quantizer_for("D").scale_mode == "absmax"
    assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"target 'D' has scale_mode='fixed' but no range; .*'fixed_range'"):
        QuantConfig(all=16, scale_mode="fixed").quantizer_for("D")
    with pytest.raises(ValueError, match=r"target_options\['act'\] gives a fixed_range, which only "
                                         r"scale_mode='fixed' uses; the target's scale_mode is 'absmax'"):
        QuantConfig(all=16, target_options={"act": {"fixed_range": 2.0}})
    with pytest.raises(ValueError, match=r"target_options\['state'\]\['fixed_range'\] must be finite"):
        QuantConfig(all=16, target_options={"state": {"scale_mode": "fixed", "fixed_range": float("nan")}})
    with pytest.raises(ValueError, match=r"target_options\['state'\]\['fixed_range'\] must be > 0 .*got -4.0"):
        QuantConfig(16, target_options={"state": {"scale_mode": "fixed", "fixed_range": -4.0}})
    with pytest.raises(ValueError, match=r"must be \[lo, hi\] with lo < hi \(symmetric=False\), got 2.0"):
        QuantConfig(16, target_options={"act": {"scale_mode": "fixed", "symmetric": False, "fixed_range": 2.0}})
    with pytest.raises(ValueError, match="fixed_range is set per target: target_options="):
        QuantConfig(all=16, fixed_range=1.0)


def test_fixed_ranges_from_the_config_run_in_both_modes():
    ranges = {"A": 3.0, "B": 0.2, "C": 2.0, "D": 2.0, "dt": 7.0, "linear": 1.0, "act": 3.0, "state": 2.0,
              "coder": 1.5}
    cfg = QuantConfig(all=16, scale_mode="fixed", target_options={t: {"fixed_range": r} for t, r in ranges.items()})
    x = np.random.default_rng(0).standard_normal((3, 20, 1))
    model = S4DModel(1, 3, d_model=4, d_state=4, n_layers=2, quant=cfg, seed=0, dtype=np.float64)
    ssm = model.blocks[0].ssm
    for mode in ("conv", "recurrent"):
        logits = model.forward(x, training=True, mode=mode)
        model.backward(np.ones_like(logits))
        assert all(np.isfinite(g).all() for g in model.grads.values())
    # the state's codes per unit come from its fixed range: inv = qpos / 2.0 (narrow grid, 16 states: qpos 7)
    assert np.all(np.asarray(ssm.quantized_recurrent()["state"].inv) == 7 / 2.0)
    assert ssm.q["act"].fixed_range == 3.0 and ssm.q["Abar"].fixed_range == 3.0


def test_per_channel_scalars_get_one_scale_per_tensor_unless_asked():
    # dt and D hold one value per channel: per-channel scales would store each value losslessly
    cfg = QuantConfig(16, per_channel=True)
    assert not cfg.target("D").per_channel and not cfg.target("dt").per_channel and cfg.target("C").per_channel
    assert cfg.spec_for("D", axis=0).axis is None and cfg.spec_for("C", axis=0).axis == 0
    assert cfg.bits_for("D") == 4
    layer = S4D(3, 4, quant=cfg, seed=0)
    assert layer.q["D"].n_scales == 1 and layer.q["C"].n_scales == 3
    # opted in, or loaded from a dict saved before the option: one scale per value, counted as float
    for old in (QuantConfig(16, per_channel=True, per_channel_scalars=True),
                QuantConfig.from_dict({**cfg.to_dict(), "options": {
                    k: v for k, v in cfg.to_dict()["options"].items() if k != "per_channel_scalars"}})):
        assert old.target("D").per_channel and old.spec_for("D", axis=0).axis == 0
        assert old.bits_for("D") is None and old.bits_for("C") == 4
        assert S4D(3, 4, quant=old, seed=0).q["D"].n_scales == 3


def test_target_options_are_typed_validated_once_and_frozen():
    import dataclasses
    cfg = QuantConfig(16, target_options={"C": {"rounding": "floor"}})
    o = cfg.target("C")
    assert (o.rounding, o.complex_mode, cfg.target("A").complex_mode) == ("floor", "shared", "cartesian")
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.rounding = "half_up"
    assert cfg.options_for("C") == {k: v for k, v in dataclasses.asdict(o).items()
                                    if k not in ("target", "fixed_range")}
    with pytest.raises(TypeError, match=r"target_options\['A'\]\['abar_bound'\] must be True or False"):
        TargetOptions("A", **{**cfg.options_for("A"), "abar_bound": 1})
    with pytest.raises(ValueError, match="target must be one of"):
        cfg.target("E")


def test_dicts_saved_before_per_channel_scalars_keep_what_they_computed():
    for per_channel in (False, True):
        old = QuantConfig(16, per_channel=per_channel).to_dict()
        del old["options"]["per_channel_scalars"]
        back = QuantConfig.from_dict(old)
        # per channel, dt and D had a scale per value; per tensor the option changes nothing: default
        assert back.options_for("D")["per_channel_scalars"] is per_channel
        assert back == QuantConfig(16, per_channel=per_channel, per_channel_scalars=per_channel)
    old = QuantConfig(16, target_options={"D": {"per_channel": True}}).to_dict()
    del old["options"]["per_channel_scalars"]
    assert QuantConfig.from_dict(old).target("D").per_channel  # a per-target per_channel counts too
