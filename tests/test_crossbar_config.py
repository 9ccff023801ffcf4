"""CrossbarConfig: SPEC.md defaults, presets, JSON round trip, strict validation."""
import pytest

from qs4d_np.hardware.config import PCM_COEFFS, CrossbarConfig


def test_default_converters_are_aihwkit_like_and_noise_is_off():
    cfg = CrossbarConfig()
    # inp_res 1/126 over [-1, 1] (codes -63..63), out_res 1/510 over [-12, 12]
    assert cfg.inp_step / (2 * cfg.inp_bound) == pytest.approx(1 / 126, rel=1e-15)
    assert cfg.inp_qmax == 63
    assert cfg.out_step / (2 * cfg.out_bound) == pytest.approx(1 / 510, rel=1e-15)
    assert cfg.out_bound == 12.0 and cfg.out_qmax == 255
    assert cfg.g_max == 25.0 and cfg.noise_management == "absmax" and cfg.bound_management
    assert (cfg.tile_rows, cfg.tile_cols, cfg.ir_drop) == (256, 256, 0.0)
    assert not cfg.has_read_noise and cfg.prog_noise == 0.0


def test_presets():
    real = CrossbarConfig.realistic()
    assert real.out_noise == 0.06 and real.prog_noise == 1.0 and real.prog_noise_type == "pcm"
    assert real.pcm_coeffs == PCM_COEFFS == (0.26348, 1.9650, -1.1731)
    assert real.dac_bits == 7 and real.adc_bits == 9
    ideal = CrossbarConfig.ideal()
    assert ideal.dac_bits is None and ideal.adc_bits is None and ideal.out_bound is None
    assert ideal.noise_management == "none" and not ideal.bound_management and not ideal.has_read_noise
    assert CrossbarConfig.ideal(out_noise=0.1).out_noise == 0.1


def test_json_roundtrip(tmp_path):
    cfg = CrossbarConfig.realistic(w_noise=0.02, w_noise_type="proportional", g_levels=16, tile_rows=64)
    assert CrossbarConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path / "xbar.json")
    assert CrossbarConfig.load(tmp_path / "xbar.json") == cfg
    # ints are accepted for float fields and normalised
    assert CrossbarConfig.from_dict({"g_max": 30}).g_max == 30.0


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ValueError, match="out_nosie"):
        CrossbarConfig.from_dict({"out_nosie": 0.1})


@pytest.mark.parametrize("key,value,exc", [
    ("g_max", 0.0, ValueError), ("g_max", -25.0, ValueError),
    ("out_noise", -0.1, ValueError), ("w_noise", -1e-3, ValueError), ("prog_noise", -1.0, ValueError),
    ("ir_drop", -1e-6, ValueError),
    ("dac_bits", 1, ValueError), ("dac_bits", 0, ValueError), ("adc_bits", -4, ValueError),
    ("dac_bits", 7.0, TypeError), ("adc_bits", "9", TypeError), ("out_noise", "0.06", TypeError),
    ("tiling", 1, TypeError), ("bound_management", "yes", TypeError), ("bm_max_rounds", True, TypeError),
    ("noise_management", "max", ValueError), ("w_noise_type", "multiplicative", ValueError),
    ("prog_noise_type", "rram", ValueError), ("dtype", "float16", ValueError),
    ("tile_rows", 0, ValueError), ("tile_cols", 2.5, TypeError), ("g_levels", 1, ValueError),
    ("pcm_coeffs", [1.0, 2.0], TypeError), ("pcm_coeffs", [1.0, "a", 2.0], TypeError),
    ("out_bound", 0.0, ValueError), ("inp_bound", float("nan"), ValueError),
    ("state_update", "delta", ValueError), ("ssm_readout", "later", ValueError),
])
def test_bad_values_name_the_key(key, value, exc):
    with pytest.raises(exc, match=key):
        CrossbarConfig.from_dict({key: value})


def test_converter_needs_a_bound():
    with pytest.raises(ValueError, match="inp_bound"):
        CrossbarConfig(inp_bound=None)
    with pytest.raises(ValueError, match="out_bound"):
        CrossbarConfig(out_bound=None)
