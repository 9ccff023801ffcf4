"""QS4D hardware cost formulas: the reference's logged values, the decoder fix, reductions,
and the datapath counter."""
import pytest

from qs4d_np.hardware.metrics import (BitWidths, MatVecOp, SSMShape, ace, adc_complexity, cost_report,
                                      count_datapath, model_size_bits, reductions, summary)

LOGGED = SSMShape(N=128, H=128, layers=4, d_in=1, d_out=10)


def test_reference_logged_values_exactly():
    r = BitWidths.uniform(12)
    assert ace(LOGGED, r) == 132_323_328
    assert ace(LOGGED, r, with_dt=False) == 28_514_304
    assert model_size_bits(LOGGED, r, compat="qs4d") == 2_362_368
    assert adc_complexity(LOGGED, r) == 800_376


def test_logged_values_need_n_128():
    r = BitWidths.uniform(12)
    # the paper model's d_state = 64 does not give the logged ACE; ACE grows with N
    values = [ace(SSMShape(N=n, H=128, layers=4, d_in=1, d_out=10), r) for n in (63, 64, 127, 128, 129)]
    assert values == sorted(values) and values.count(132_323_328) == 1 and values[3] == 132_323_328


def test_corrected_decoder_term():
    r = BitWidths.uniform(12)
    bug = model_size_bits(LOGGED, r, compat="qs4d")
    fixed = model_size_bits(LOGGED, r)
    # the decoder stores H x d_out weights, not H x d_in
    assert fixed - bug == 128 * (10 - 1) * 12
    assert cost_report(LOGGED, r).model_size_bits == fixed
    with pytest.raises(ValueError, match="compat"):
        model_size_bits(LOGGED, r, compat="paper")


def test_each_term_follows_its_bit_width():
    shape = SSMShape(N=4, H=3, layers=2, d_in=1, d_out=5)
    base = BitWidths.uniform(8)
    # ACE is linear in r_A (only the first term holds it): doubling r_A adds L*H*N*r_A*r_state*r_dt
    assert ace(shape, BitWidths(**{**base.__dict__, "A": 16})) - ace(shape, base) == 2 * 3 * 4 * 8 * 8 * 8
    # the adc figure does not depend on A, C, dt, coder
    assert adc_complexity(shape, BitWidths(**{**base.__dict__, "A": 2, "C": 3, "dt": 1, "coder": 4})) \
        == adc_complexity(shape, base)
    # a trained B adds H*N*r_B*r_act per layer
    assert ace(shape, BitWidths.uniform(8, B=8)) - ace(shape, base) == 2 * 3 * 4 * 8 * 8


def test_reductions_vs_float():
    paper = SSMShape(N=64, H=128, layers=4, d_in=1, d_out=10)
    red = reductions(paper, BitWidths.uniform(8))
    # memory and ADC are linear in the bits: 32/8; ACE has a cubic term: between 16x and 64x
    assert red["model_size_bits"] == pytest.approx(4.0) and red["adc"] == pytest.approx(4.0)
    assert 16 < red["ace"] < 64 and red["ace_without_dt"] == pytest.approx(16.0)
    assert reductions(paper, BitWidths.float32()) == {k: 1.0 for k in red}
    table = summary(paper, BitWidths.uniform(8), compat="qs4d")
    assert table["model_size_bits"]["quantized"] == model_size_bits(paper, BitWidths.uniform(8), compat="qs4d")
    assert table["adc"]["baseline"] == adc_complexity(paper, BitWidths.float32())
    mixed = BitWidths(A=5, C=3, dt=2, state=6, act=6, lin=4, coder=3)
    assert reductions(paper, mixed, baseline=BitWidths.uniform(8))["ace"] > 1


@pytest.mark.parametrize("kwargs,match", [
    ({"N": 0, "H": 1, "layers": 1, "d_in": 1, "d_out": 1}, "SSMShape.N"),
    ({"N": 4, "H": 2.0, "layers": 1, "d_in": 1, "d_out": 1}, "SSMShape.H"),
])
def test_bad_shapes_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SSMShape(**kwargs)


def test_bad_bits_are_named():
    with pytest.raises(ValueError, match="BitWidths.A"):
        BitWidths(A=0)
    with pytest.raises(TypeError, match="BitWidths.state"):
        BitWidths(state=7.5)
    with pytest.raises(ValueError, match="BitWidths.B"):
        BitWidths(B=-1)


def test_datapath_counts_with_pruning():
    ops = [MatVecOp("A", rows=8, cols=8, weight_bits=6, input_bits=8, output_bits=8, calls=10),
           MatVecOp("mix", rows=8, cols=16, weight_bits=4, input_bits=6, output_bits=6, active_cols=12),
           MatVecOp("dec", rows=8, cols=10, weight_bits=3, input_bits=6, output_bits=0, active_rows=5)]
    c = count_datapath(ops)
    assert c.macs == {(6, 8): 640, (4, 6): 96, (3, 6): 50}
    assert c.bits_stored == 64 * 6 + 96 * 4 + 50 * 3
    assert c.adc_conversions == 80 + 12 and c.adc_bits == 80 * 8 + 12 * 6
    assert c.bit_ops == 640 * 48 + 96 * 24 + 50 * 18
    with pytest.raises(ValueError, match="active_cols"):
        MatVecOp("x", rows=2, cols=2, weight_bits=1, input_bits=1, output_bits=1, active_cols=3)
    with pytest.raises(TypeError, match="MatVecOp"):
        count_datapath([("A", 1, 1)])


# -- the datapath of a model ---------------------------------------------------
def _tiny(**kw):
    import numpy as np
    from qs4d_np.models.s4d_model import S4DModel
    return S4DModel(2, 3, d_model=4, d_state=6, n_layers=2, dropout=0.0, seed=0, dtype=np.float64, **kw)


def test_model_datapath_counts_by_hand():
    from qs4d_np.hardware.datapath import model_datapath
    model = _tiny()
    r = BitWidths(A=5, C=4, dt=3, state=7, act=6, lin=3, coder=2, D=8)
    c = count_datapath(model_datapath(model, r))
    H, M, L, din, dout = 4, 3, 2, 2, 3
    # per layer: Abar 4 MACs/mode (5x7), Bbar 2/mode (A's width x act: 5x6), C 2/mode (4x7), D 1/channel (8x6),
    # mixing H*2H (3x6); encoder din*H and decoder H*dout (2x6)
    assert c.macs == {(5, 7): L * H * M * 4, (5, 6): L * H * M * 2, (4, 7): L * H * M * 2, (8, 6): L * H,
                      (3, 6): L * H * 2 * H, (2, 6): din * H + H * dout}
    assert c.bits_stored == L * H * (M * (4 * 5 + 2 * 5 + 2 * 4) + 8 + 2 * H * 3) + (din * H + H * dout) * 2
    # conversions: encoder H, per layer 2 per mode (state) + 1 per channel (y) + 2H (mixing), decoder d_out
    assert c.adc_conversions == H + L * (H * (2 * M + 1) + 2 * H) + dout
    assert c.adc_bits == H * 6 + L * (H * 2 * M * 7 + H * 6 + 2 * H * 6) + dout * 6


def test_model_datapath_drops_pruned_parts():
    from qs4d_np.hardware.datapath import model_datapath
    from qs4d_np.hardware.pruning import prune_magnitude
    model = _tiny()
    r = BitWidths.uniform(8)
    full = count_datapath(model_datapath(model, r))
    prune_magnitude(model, 0.25, "channel").apply(model)  # one of 4 channels per layer
    pruned = count_datapath(model_datapath(model, r))
    H, M = 4, 3
    # per layer one channel: 2M+1 readouts, its modes' 8 MACs each + D, and one mixing input row (2H MACs)
    assert full.adc_conversions - pruned.adc_conversions == 2 * (2 * M + 1)
    assert sum(full.macs.values()) - sum(pruned.macs.values()) == 2 * (M * 8 + 1 + 2 * H)


def test_bit_widths_from_quant_config():
    from qs4d_np.hardware.datapath import bit_widths
    from qs4d_np.quant.config import QuantConfig
    q = QuantConfig(all=[16, 256], C=4, dt="float")
    assert bit_widths(q, 0) == BitWidths(A=4, C=2, dt=32, state=4, act=4, lin=4, coder=4, D=4, B=0)
    assert bit_widths(q, 1).A == 8 and bit_widths(q, 1, learn_B=True).B == 8
    assert bit_widths(None) == BitWidths.float32()


def test_metrics_table_reductions_and_bad_bits():
    from qs4d_np.hardware.datapath import metrics_table, model_datapath
    model = _tiny()
    table = metrics_table(model, BitWidths.uniform(8))
    assert table["datapath"]["bits_stored"]["reduction"] == 4.0   # 32 -> 8 bits on every stored weight
    assert table["datapath"]["bit_ops"]["reduction"] == 16.0      # both operands 32 -> 8
    assert table["datapath"]["adc_conversions"]["reduction"] == 1.0
    assert table["formulas"]["adc"]["reduction"] == 4.0
    with pytest.raises(ValueError, match="bits must be a BitWidths or a list of 2"):
        model_datapath(model, [BitWidths.uniform(8)])
    # pruning shows in the reductions: the baseline stays the dense float model
    from qs4d_np.hardware.pruning import prune_magnitude
    prune_magnitude(model, 0.5, "mode").apply(model)
    pruned = metrics_table(model, BitWidths.uniform(8))
    for key in ("bit_ops", "bits_stored", "adc_conversions"):
        assert pruned["datapath"][key]["baseline"] == table["datapath"][key]["baseline"]
        assert pruned["datapath"][key]["reduction"] > table["datapath"][key]["reduction"]
