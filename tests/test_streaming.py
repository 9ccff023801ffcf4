"""Streaming a whole S4DModel (and a block, a layer) one time step at a time: the logits after
step t against forward(x[:, :t+1], mode="recurrent"), float and QAT; frozen streams (snapshots);
state checks and errors."""
import numpy as np
import pytest

from qs4d_np import S4D, S4DModel
from qs4d_np.models.block import S4DBlock
from qs4d_np.models.s4d_model import StreamState
from qs4d_np.quant import QuantConfig
from qs4d_np.train.ptq import calibrate

RUNNING = {"act": {"scale_mode": "running"}, "state": {"scale_mode": "running"}}
# The block structures of both presets, and prenorm.
STRUCTURES = {"example": dict(norm="layer", prenorm=False, residual=True),    # LayerNorm + residual
              "qs4d": dict(norm="batch", prenorm=False, residual=False),      # BatchNorm, no residual
              "prenorm": dict(norm="layer", prenorm=True, residual=True)}
QUANTS = {"float": None,
          # SSM parameters, mixing and coder weights quantized; state and act float
          "params": QuantConfig(256, state="float", act="float"),
          "tensor": QuantConfig(256, target_options=RUNNING),
          "channel": QuantConfig(256, per_channel=True, target_options=RUNNING)}
B, L = 3, 6


def build(structure, quant, pool, dtype, mixing="glu", d_input=2, **options):
    """A tiny model in evaluation with trained BatchNorm statistics and calibrated (static) ranges."""
    model = S4DModel(d_input, 3, d_model=8, d_state=8, n_layers=2, pool=pool, dtype=dtype, seed=1,
                     quant=QUANTS[quant], mixing=mixing, **STRUCTURES[structure], **options)
    x = np.random.default_rng(2).standard_normal((B, L, d_input)).astype(dtype)
    if structure == "qs4d":
        model.forward(x, training=True)  # running statistics away from (0, 1)
    if quant in ("tensor", "channel"):
        calibrate(model, [x], mode="recurrent")  # the state range needs a recurrent forward
    return model, x


def stream_logits(model, x):
    """Logits after every step of one stream, (L, batch, d_output)."""
    stream, state, out = model.stream(), model.initial_state(x.shape[0]), []
    for t in range(x.shape[1]):
        logits, state = stream.step(x[:, t], state)
        out.append(logits)
    return np.stack(out)


def prefix_logits(model, x):
    return np.stack([model.forward(x[:, :t + 1], mode="recurrent") for t in range(x.shape[1])])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("quant", ["float", "params"])
@pytest.mark.parametrize("pool", ["mean", "last"])
def test_stream_logits_are_the_prefix_forward_to_rounding(dtype, structure, quant, pool):
    # Float state: the forward's float scan reassociates its sums over the M modes (fastmath), the
    # mixing and encoder products run in BLAS on batch*length rows instead of batch rows (OpenBLAS
    # rounds a row differently with the row count, measured up to ~5 ulp at H = 16), and
    # LayerNorm divides by a per-row std. Each moves a value by a few ulp of its size; through two
    # layers of O(1) activations the logits move by a few ulp of max(1, |logits|). Bound: 64 ulp
    # of the dtype (measured: at most ~2 ulp, float32 and float64 alike).
    model, x = build(structure, quant, pool, dtype)
    got, want = stream_logits(model, x), prefix_logits(model, x)
    assert got.dtype == dtype
    assert np.abs(got - want).max() <= 64 * np.finfo(dtype).eps * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("quant", ["tensor", "channel"])
@pytest.mark.parametrize("pool", ["mean", "last"])
@pytest.mark.parametrize("dtype, mixing, d_input", [(np.float64, "glu", 2), (np.float32, None, 1)])
def test_quantized_stream_equals_the_prefix_forward(structure, quant, pool, dtype, mixing, d_input):
    # The quantized SSM core steps bit for bit (S4DQuant.frozen_core); norms, GELU, residual and
    # pooling are per row or per element, and the decoder multiplies the same (batch, H) rows.
    # * float32 without mixing and d_input = 1: every other product is a single multiply (the
    #   encoder), so the arithmetic is identical: equal logits.
    # * float64 with the GLU mixing: the mixing rows round with the BLAS row count (~1e-15
    #   relative), which changes a state / act code only where a value lies within that of a
    #   rounding edge of the 256-level grid (~1e-13 per value): equal logits (measured).
    # (float32 with the mixing: a code at an edge may move by one step; tests/test_s4d_quantized.)
    model, x = build(structure, quant, pool, dtype, mixing=mixing, d_input=d_input)
    got, want = stream_logits(model, x), prefix_logits(model, x)
    assert got.dtype == dtype and np.array_equal(got, want)


def test_state_clip_and_other_rounding_stream_bit_for_bit():
    cfg = QuantConfig(64, rounding="half_away", target_options=RUNNING)
    model = S4DModel(2, 3, d_model=8, d_state=8, n_layers=2, pool="last", dtype=np.float64, seed=1, quant=cfg,
                     state_clip=0.5)
    x = np.random.default_rng(2).standard_normal((B, L, 2))
    calibrate(model, [x], mode="recurrent")
    assert np.array_equal(stream_logits(model, x), prefix_logits(model, x))


def test_layer_stepper_of_one_channel_and_batch_one_is_bit_for_bit():
    # H = 1, batch 1: the read-out's modes axis is then the fast one; the step adds in order itself
    cfg = QuantConfig(2**16, act="float", target_options=RUNNING)
    layer = S4D(1, 16, quant=cfg, dtype=np.float32, seed=3, mixing=None, layer=0)
    u = np.random.default_rng(4).standard_normal((1, 30, 1)).astype(np.float32)
    layer.forward(u, training=True, mode="recurrent")
    stepper, state, ys = layer.stepper(), layer.stepper().initial_state(1), []
    for t in range(u.shape[1]):
        y, state = stepper.step(u[:, t], state)
        ys.append(y)
    assert np.array_equal(np.stack(ys, axis=1), layer.forward(u, mode="recurrent"))


def test_stepper_is_step_with_a_mode_major_state_and_a_snapshot():
    model, x = build("example", "channel", "mean", np.float32)
    layer = model.blocks[0].ssm
    u = np.random.default_rng(5).standard_normal((B, L, 8)).astype(np.float32)
    stepper = layer.stepper()
    s_step, s_fast = layer.initial_state(B), stepper.initial_state(B)
    assert s_step.shape == (B, 8, 4) and s_fast.shape == (4, B, 8)
    for t in range(L):
        y_step, s_step = layer.step(u[:, t], s_step)
        y_fast, s_fast = stepper.step(u[:, t], s_fast)
        assert np.array_equal(y_step, y_fast) and np.array_equal(s_step, s_fast.transpose(1, 2, 0))
    # the frozen constants are read-only copies; a change of the layer does not reach the stepper
    with pytest.raises(ValueError, match="read-only"):
        stepper.core.Abar[0, 0] = 0
    y_before, _ = stepper.step(u[:, 0], s_fast)
    assert stepper.is_current()
    layer.params["C"][...] *= 2
    assert not stepper.is_current()
    assert np.array_equal(stepper.step(u[:, 0], s_fast)[0], y_before)
    assert not np.array_equal(layer.stepper().step(u[:, 0], s_fast)[0], y_before)


def test_model_stream_is_a_snapshot_and_says_when_the_model_changed():
    model, x = build("qs4d", "tensor", "mean", np.float64)
    stream = model.stream()
    want = stream_logits(model, x)
    assert stream.is_current()
    model.forward(x, training=True)  # BatchNorm statistics and running ranges move
    assert not stream.is_current()
    state = stream.initial_state(B)
    for t in range(L):
        logits, state = stream.step(x[:, t], state)
    assert np.array_equal(logits, want[-1])  # the stream still computes with its snapshot
    assert not np.array_equal(stream_logits(model, x)[-1], want[-1])
    assert model.stream().is_current()
    with pytest.raises(RuntimeError, match="S4DBlock stepper was built without a snapshot .* ask the stream's"):
        stream.blocks[0].is_current()  # the stream tracks the whole model, not each block again


def test_block_step_is_its_stepper_and_the_block_forward():
    block = S4DBlock(8, d_state=8, norm="layer", prenorm=True, dtype=np.float64, seed=6)
    u = np.random.default_rng(7).standard_normal((B, L, 8))
    stepper, s_step, s_fast, ys = block.stepper(), block.initial_state(B), block.stepper().initial_state(B), []
    for t in range(L):
        y, s_step = block.step(u[:, t], s_step)
        y_fast, s_fast = stepper.step(u[:, t], s_fast)
        assert np.array_equal(y, y_fast) and np.array_equal(s_step, s_fast.transpose(1, 2, 0))
        ys.append(y)
    want = block.forward(u, mode="recurrent")
    assert np.abs(np.stack(ys, axis=1) - want).max() <= 64 * np.finfo(np.float64).eps * np.abs(want).max()


def test_model_step_is_the_stream_step_and_leaves_states_and_caches_alone():
    model, x = build("example", "channel", "mean", np.float32)
    w = np.random.default_rng(8).standard_normal((B, 3)).astype(np.float32)
    model.forward(x, training=False, mode="recurrent")
    dx = model.backward(w)
    model.forward(x, training=False, mode="recurrent")  # a pending backward
    stream, state = model.stream(), model.initial_state(B)
    s0 = [s.copy() for s in state.ssm]
    a, s_model = model.step(x[:, 0], state)
    b, s_stream = stream.step(x[:, 0], state)
    assert np.array_equal(a, b) and all(np.array_equal(p, q) for p, q in zip(s_model.ssm, s_stream.ssm))
    assert all(np.array_equal(p, q) for p, q in zip(state.ssm, s0)) and state.steps == 0  # not modified
    assert s_model.steps == 1 and s_model.batch == B and s_model.pool_sum.shape == (B, 8)
    assert np.array_equal(model.backward(w), dx)  # the pending backward is intact


def test_streaming_refuses_data_dependent_ranges_naming_the_layer_and_quantizer():
    cfg = QuantConfig(256, act=["float", 16], target_options={"state": {"scale_mode": "running"}})  # act[1] absmax
    model = S4DModel(2, 3, d_model=8, d_state=8, n_layers=2, quant=cfg, seed=0)
    x = np.random.default_rng(0).standard_normal((B, L, 2)).astype(np.float32)
    calibrate(model, [x], mode="recurrent")
    model.forward(x, mode="recurrent")  # the forward takes the act range from the sequence
    with pytest.raises(ValueError, match=r"S4DModel\.stream\(\), layer 1 \(layers\.1\.ssm\): quantizer 'act\[1\]' "
                                         r"\(target 'act', scale_mode='absmax'\) takes its range from the whole "
                                         r"sequence.*calibrate static ranges"):
        model.stream()
    with pytest.raises(ValueError, match=r"S4DModel\.step\(\), layer 1 \(layers\.1\.ssm\): quantizer 'act\[1\]'"):
        model.step(x[:, 0], model.initial_state(B))
    fresh = S4DModel(2, 3, d_model=8, d_state=8, n_layers=2, quant=QuantConfig(256, target_options=RUNNING))
    with pytest.raises(RuntimeError, match=r"Quantizer 'x\[0\]' \(scale_mode='running'\) has no calibrated range"):
        fresh.stream()


def test_stream_state_and_input_checks():
    model, x = build("example", "float", "mean", np.float32)
    last, _ = build("example", "float", "last", np.float32)
    stream = model.stream()
    state = model.initial_state(B)
    assert state.batch == B and state.steps == 0 and len(state.ssm) == 2 and state.ssm[0].shape == (4, B, 8)
    assert last.initial_state(B).pool_sum is None
    with pytest.raises(ValueError, match=r"x_t must have shape \(batch, 2\), got \(3, 3\)"):
        stream.step(np.zeros((B, 3)), state)
    with pytest.raises(ValueError, match=r"x_t must have 2 dimensions, got shape \(3, 1, 2\)"):
        stream.step(np.zeros((B, 1, 2)), state)
    with pytest.raises(ValueError, match=r"x_t contains 1 non-finite value\(s\)"):
        stream.step(np.where(np.arange(2 * B).reshape(B, 2) == 3, np.nan, 0.0), state)
    with pytest.raises(TypeError, match="state must be a StreamState .* got tuple"):
        stream.step(x[:, 0], tuple(state.ssm))
    with pytest.raises(ValueError, match=r"state.ssm\[0\] must have shape \(4, 2, 8\) and dtype complex64 "
                                         r"\(x_t has batch 2\), got shape \(4, 3, 8\)"):
        stream.step(x[:2, 0], state)
    with pytest.raises(ValueError, match=r"state.ssm must hold 2 arrays \(one per block\), got 1"):
        stream.step(x[:, 0], StreamState(state.ssm[:1], state.pool_sum, 0))
    with pytest.raises(ValueError, match=r"state.ssm\[1\] must have shape .* dtype complex64.*dtype complex128"):
        stream.step(x[:, 0], StreamState((state.ssm[0], state.ssm[1].astype(np.complex128)), state.pool_sum, 0))
    with pytest.raises(ValueError, match=r"state.pool_sum must be a float64 array of shape \(3, 8\) for mean "
                                         r"pooling, got None"):
        stream.step(x[:, 0], last.initial_state(B))
    with pytest.raises(ValueError, match="state.pool_sum must be None for last pooling"):
        last.stream().step(x[:, 0], state)
    with pytest.raises(ValueError, match="StreamState.steps must be >= 0, got -1"):
        StreamState(state.ssm, state.pool_sum, -1)
    with pytest.raises(TypeError, match="StreamState.ssm must be a non-empty tuple of arrays"):
        StreamState([s for s in state.ssm], state.pool_sum, 0)
    with pytest.raises(ValueError, match="batch must be >= 1"):
        model.initial_state(0)
    # the layer / block steppers check their mode-major state
    stepper = model.blocks[0].stepper()
    with pytest.raises(ValueError, match=r"state must have shape \(4, 3, 8\)"):
        stepper.step(np.zeros((B, 8)), np.zeros((B, 8, 4), dtype=np.complex64))
