"""The fused streaming kernel (kernels.stream) against its loop twin (reference/stream.py) over random
small shapes and options; the fused stream against the per-op Python path, its own step loop and the
packing's pieces."""
import ast
import inspect

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qs4d_np import S4DModel
from qs4d_np.core.norm import BatchNorm
from qs4d_np.kernels import stream as k
from qs4d_np.quant import QuantConfig
from qs4d_np.train.ptq import calibrate
from reference import stream as twin

RUNNING = {"act": {"scale_mode": "running"}, "state": {"scale_mode": "running"}}


def _packed(rng, *, B, T, L, M, H, dtype, encode, act, mixing, norm, prenorm, residual, pool, kinds, dyadic):
    """Random arguments of ``stream_steps`` in its packed layout. ``dyadic``: every value a small
    multiple of a power of two and every scale a power of two, so that each operation is exact
    (in float32 too) and rounding ties are common (a value lands on k + 1/2 codes often)."""
    def values(shape, scale=1.0, step=0.25):
        v = rng.standard_normal(shape) * scale
        return np.round(v / step) * step if dyadic else v

    x = values((T, B, 1 if encode else H), 1.0)
    enc = values((2, H), 1.0)
    radius = rng.uniform(0.3, 0.95, (L, M, H))
    theta = rng.uniform(-3, 3, (L, M, H))
    ar, ai = radius * np.cos(theta), radius * np.sin(theta)
    if dyadic:
        ar, ai = np.round(ar * 8) / 8, np.round(ai * 8) / 8
    ssm = np.stack([ar, ai, values((L, M, H), 0.5), values((L, M, H), 0.5), values((L, M, H), 0.7, 0.125),
                    values((L, M, H), 0.7, 0.125)], axis=2)
    vec = np.zeros((L, k.VEC_ROWS, H))
    vec[:, k.D] = values((L, H), 1.0)
    scale = (lambda shape: 2.0 ** rng.integers(0, 3, shape)) if dyadic else (lambda shape: rng.uniform(2, 40, shape))
    vec[:, k.STATE_INV_RE], vec[:, k.STATE_INV_IM], vec[:, k.ACT_INV] = scale((L, H)), scale((L, H)), scale((L, H))
    per_tensor = rng.random(L) < 0.5  # one act scale repeated over the channels
    vec[per_tensor, k.ACT_INV] = vec[per_tensor, k.ACT_INV, :1]
    vec[:, k.ACT_ZP] = rng.integers(-3, 4, (L, H)) * (rng.random((L, 1)) < 0.5)  # asymmetric in some layers
    vec[:, k.NORM_W] = 1.0 + values((L, H), 0.3)
    vec[:, k.NORM_B] = values((L, H), 0.3)
    bits = rng.integers(2, 8, (L, 2))
    scal = np.zeros((L, k.SCAL_COLS))
    scal[:, k.CLIP] = np.where(rng.random(L) < 0.5, np.inf, 1.5 if dyadic else rng.uniform(0.3, 2.0, L))
    scal[:, k.STATE_QMIN], scal[:, k.STATE_QMAX] = -(2.0 ** bits[:, 0]), 2.0 ** bits[:, 0] - 1
    scal[:, k.ACT_QMIN], scal[:, k.ACT_QMAX] = -(2.0 ** bits[:, 1]), 2.0 ** bits[:, 1] - 1
    lflags = np.zeros((L, k.LFLAG_COLS), np.int64)
    lflags[:, k.STATE_KIND] = kinds
    lflags[:, k.STATE_ROUNDING] = rng.integers(0, 4, L)
    lflags[:, k.ACT_QUANT] = rng.integers(0, 2, L)
    lflags[:, k.ACT_ROUNDING] = rng.integers(0, 4, L)
    opts = np.zeros(k.OPT_COUNT, np.int64)
    opts[[k.ENCODE, k.ACTIVATION, k.MIXING, k.NORM, k.PRENORM, k.RESIDUAL, k.POOL]] = (
        encode, act, mixing, norm, prenorm, residual, pool)
    W = values((L, H, 2 * H), 1 / np.sqrt(H)) if mixing else np.zeros((L, 0, 0))
    wb = values((L, 2 * H), 0.3) if mixing else np.zeros((L, 0))
    states = tuple((values((M, B, H), 0.5) + 1j * values((M, B, H), 0.5)).astype(np.result_type(dtype, np.complex64))
                   for _ in range(L))
    pool_in = values((B, H), 2.0) if pool == k.POOL_MEAN else np.zeros((0, H))
    cast = [np.ascontiguousarray(a, dtype=dtype) for a in (x, enc, ssm, vec, scal)]
    return (*cast, np.full(L, 1e-5), lflags, opts, np.ascontiguousarray(W, dtype), np.ascontiguousarray(wb, dtype),
            states, pool_in, int(rng.integers(0, 5)))


def _outputs(args):
    x, *_, states, pool_in, _ = args
    T, B = x.shape[:2]
    L, (M, _, H) = len(states), states[0].shape
    return (np.full((L, M, B, H), np.nan, states[0].dtype), np.full(pool_in.shape, np.nan),
            np.full((T, B, H), np.nan, x.dtype))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), T=st.integers(1, 5), L=st.integers(1, 3),
       M=st.integers(1, 4), H=st.integers(1, 6), dtype=st.sampled_from([np.float64, np.float32]),
       encode=st.booleans(), act=st.sampled_from([k.ACT_NONE, k.ACT_GELU, k.ACT_RELU]), mixing=st.booleans(),
       norm=st.sampled_from([k.NORM_NONE, k.NORM_LAYER, k.NORM_BATCH]), prenorm=st.booleans(),
       residual=st.booleans(), pool=st.sampled_from([k.POOL_MEAN, k.POOL_LAST]),
       kinds=st.lists(st.sampled_from([k.STATE_FLOAT, k.STATE_CLIP, k.STATE_QUANT]), min_size=3, max_size=3),
       dyadic=st.booleans(), stages=st.integers(1, 3), chunk=st.integers(1, 3))
def test_kernel_matches_its_loop_twin(seed, B, T, L, M, H, dtype, encode, act, mixing, norm, prenorm, residual,
                                      pool, kinds, dyadic, stages, chunk):
    if dyadic:  # keep every operation exact: no transcendental functions, no LayerNorm's square root
        act = k.ACT_RELU if act == k.ACT_GELU else act
        mixing, norm = False, k.NORM_BATCH if norm == k.NORM_LAYER else norm
        # a quantized state stays on a coarse grid; a float one gains bits every step and float32
        # would round it
        kinds = [k.STATE_QUANT] * 3 if dtype == np.float32 else kinds
    elif dtype == np.float32:  # float32 against float64 is compared with a tolerance: no quantizer,
        kinds = [k.STATE_FLOAT if kind == k.STATE_QUANT else kind for kind in kinds]  # whose codes could move
    rng = np.random.default_rng(seed)
    args = _packed(rng, B=B, T=T, L=L, M=M, H=H, dtype=dtype, encode=encode, act=act, mixing=mixing, norm=norm,
                   prenorm=prenorm, residual=residual, pool=pool, kinds=kinds[:L], dyadic=dyadic)
    if dtype == np.float32 and not dyadic:
        args[6][:, k.ACT_QUANT] = 0
    got, want, piped = _outputs(args), _outputs(args), _outputs(args)
    assert k.stream_steps(*args, *got) == twin.stream_steps(*args, *want) == (0, 0)
    # the pipelined kernel (its twin is the serial one's): the same operations on each layer in the
    # same step order, only spread over threads, so the serial kernel's bits in every dtype
    assert k.stream_steps_pipelined(*args, *piped, stages, chunk) == (0, 0)
    for g, p in zip(got, piped):
        assert np.array_equal(g, p)
    if dtype == np.float64 and norm != k.NORM_LAYER or dyadic:
        # the same operations in the same order on float64 (or exactly representable) values
        for g, w in zip(got, want):
            assert np.array_equal(g, w)
        return
    for g, w in zip(got, want):
        scale = max(1.0, np.abs(w).max(initial=0.0))
        if dtype == np.float64:
            # LayerNorm's kernel sums its rows reassociated: each normalised value moves by a few
            # ulp (H <= 6 terms); through <= 2 layers, <= 4 steps of |Abar| < 1, mixing weights
            # ~1/sqrt(H) and the norms' O(1) gains that stays below 1e-12 relative. A state or act
            # code moves only if a value lies within that of a rounding edge (never seen).
            assert np.abs(g - w).max(initial=0.0) <= 1e-10 * scale
        else:
            # float32 arithmetic against the float64 twin, no quantizer: each of the <= ~30
            # roundings on a value's path (state update, the M-term read-out, the H-term mixing
            # sum, GLU, norm) adds ~6e-8 relative; the recurrence and two layers amplify by O(10)
            assert np.abs(g - w).max(initial=0.0) <= 2e-4 * scale


def test_kernel_reports_non_finite_input_and_act_values():
    rng = np.random.default_rng(0)
    args = list(_packed(rng, B=2, T=2, L=2, M=2, H=3, dtype=np.float64, encode=True, act=k.ACT_NONE, mixing=False,
                        norm=k.NORM_NONE, prenorm=False, residual=True, pool=k.POOL_MEAN,
                        kinds=[k.STATE_FLOAT, k.STATE_FLOAT], dyadic=False))
    x = args[0].copy()
    x[1, 0, 0] = np.nan
    args[0] = x
    assert k.stream_steps(*args, *_outputs(args)) == twin.stream_steps(*args, *_outputs(args)) == (-1, 0)
    x[1, 0, 0] = 1e300  # finite, but the layer's output overflows: D*u, then 2*acc + D*u
    args[6][1, k.ACT_QUANT] = 1
    args[3] = args[3].copy()
    args[3][:, k.D] = 1e300
    status = k.stream_steps(*args, *_outputs(args))
    assert status == twin.stream_steps(*args, *_outputs(args)) and status[0] in (1, 2) and status[1] >= 1
    assert k.stream_steps_pipelined(*args, *_outputs(args), 2, 1) == status


def test_pipelined_kernel_reports_the_first_failure_in_step_order():
    # Layer 1 (the second stage) fails at step 1, layer 0 (the first stage) at step 2. With chunks of
    # 3 steps the first stage meets its failure before the second stage has run step 1: the kernel
    # must still report the serial order's first failure, layer 1's
    rng = np.random.default_rng(1)
    args = list(_packed(rng, B=1, T=6, L=2, M=2, H=3, dtype=np.float64, encode=True, act=k.ACT_NONE, mixing=False,
                        norm=k.NORM_NONE, prenorm=False, residual=True, pool=k.POOL_MEAN,
                        kinds=[k.STATE_FLOAT, k.STATE_FLOAT], dyadic=False))
    x, enc, vec, lflags = (args[i].copy() for i in (0, 1, 3, 6))
    x[:] = 0.0
    x[1], x[2] = 1e200, 1e300        # the encoder (weight 1, bias 0) passes them on
    enc[0], enc[1] = 1.0, 0.0
    vec[0, k.D], vec[1, k.D] = 1e10, 1e200  # step 1: layer 1's D*u = inf; step 2: layer 0's D*u = inf
    lflags[:, k.ACT_QUANT] = 1       # layer 0's act quantizer bounds its output: layer 1 sees ~1e200
    args[0], args[1], args[3], args[6] = x, enc, vec, lflags
    serial = k.stream_steps(*args, *_outputs(args))
    assert serial == twin.stream_steps(*args, *_outputs(args)) and serial[0] == 2
    for chunk in (1, 2, 3):
        assert k.stream_steps_pipelined(*args, *_outputs(args), 2, chunk) == serial


# -- the fused stream ---------------------------------------------------------------------------------------
def _model(dtype=np.float32, quant=None, d_input=1, length=6, **options):
    """A small model in evaluation with trained BatchNorm statistics and calibrated ranges, and a
    test input (batch 3) other than the calibration data: on the calibration data itself the
    largest value lands on the top code up to rounding, an edge of the floor rule."""
    model = S4DModel(d_input, 3, d_model=16, d_state=8, n_layers=2, dtype=dtype, seed=1, quant=quant, **options)
    rng = np.random.default_rng(2)
    calib, x = (rng.standard_normal((3, length, d_input)).astype(dtype) for _ in range(2))
    if options.get("norm") == "batch":
        model.forward(calib, training=True)  # running statistics away from (0, 1)
    if quant is not None:
        calibrate(model, [calib], mode="recurrent")
    return model, x


def _stepped(stream, x, state=None):
    state = stream.initial_state(x.shape[0]) if state is None else state
    out = []
    for t in range(x.shape[1]):
        logits, state = stream.step(x[:, t], state)
        out.append(logits)
    return np.stack(out, axis=1), state


CASES = {  # structures and quantizers the fused kernel must run as the per-op path does
    "example QAT": dict(quant=QuantConfig(256, target_options=RUNNING)),
    "qs4d QAT per channel": dict(quant=QuantConfig(64, per_channel=True, target_options=RUNNING), norm="batch",
                                 residual=False, activation=None, init="qs4d"),
    "prenorm relu clip half_up": dict(quant=QuantConfig(128, rounding="half_up", target_options=RUNNING),
                                      prenorm=True, activation="relu", state_clip=0.7, pool="last"),
    "half_away, clip only": dict(quant=QuantConfig(256, rounding="half_away", state="float", act="float",
                                                   target_options=RUNNING), state_clip=0.5),
    "floor, no norm, float state": dict(quant=QuantConfig(32, rounding="floor", state="float",
                                                          target_options=RUNNING), norm=None),
    "float": dict(),
}
FLOAT_STATE = ("floor, no norm, float state", "float")  # no state target, no clip


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mixing", ["glu", None])
def test_fused_stream_is_the_per_op_path(case, mixing):
    # A quantized or clipped state without mixing: the two paths do the same operations in the same
    # order (the encoder's one-term product, the core in the scan's order, the forward's own LayerNorm
    # kernel): equal bits, float32 and float64. Otherwise a few ulp per value: the mixing product is
    # summed in order in the kernel and by BLAS in the per-op path (which also fuses multiply-adds),
    # and a float state is updated by NumPy's complex multiply there (SIMD loops that may fuse them
    # too); absorbed by a quantized act except at a rounding edge, else carried to the logits: a
    # bound of 64 ulp of max(1, |logits|), as tests/test_streaming.py's (measured: a few ulp).
    for dtype in (np.float32, np.float64):
        model, x = _model(dtype, mixing=mixing, **CASES[case])
        fused, per_op = model.stream(), model.stream(fused=False)
        assert fused.fused and not per_op.fused
        (got, s_got), (want, s_want) = _stepped(fused, x), _stepped(per_op, x)
        assert got.dtype == dtype and s_got.steps == s_want.steps == x.shape[1]
        if mixing is None and case not in FLOAT_STATE:
            assert np.array_equal(got, want)
            assert all(np.array_equal(a, b) for a, b in zip(s_got.ssm, s_want.ssm))
        else:
            assert np.abs(got - want).max() <= 64 * np.finfo(dtype).eps * max(1.0, np.abs(want).max())


def test_fused_stream_at_the_preset_size_is_the_per_op_path_bit_for_bit():
    # H = 128, N = 64 (M = 32 modes): LayerNorm's kernel and the float64 read-out over 32 modes at the
    # benchmark's size; QAT float32 without mixing, so every operation is the per-op path's
    model = S4DModel.from_preset("s4d-example", 1, 10, seed=0, mixing=None,
                                 quant=QuantConfig(256, target_options=RUNNING))
    x = np.random.default_rng(3).standard_normal((2, 5, 1)).astype(np.float32)
    calibrate(model, [x], mode="recurrent")
    assert np.array_equal(_stepped(model.stream(), x)[0], _stepped(model.stream(fused=False), x)[0])


def test_run_is_the_step_loop_bit_for_bit_and_continues_a_state():
    model, x = _model(np.float32, quant=QuantConfig(256, target_options=RUNNING), d_input=2, length=7)
    stream = model.stream()
    want, s_want = _stepped(stream, x)
    got, s_got = stream.run(x)
    assert got.shape == (3, 7, 3) and np.array_equal(got, want) and s_got.steps == 7
    assert all(np.array_equal(a, b) for a, b in zip(s_got.ssm, s_want.ssm))
    assert np.array_equal(s_got.pool_sum, s_want.pool_sum)
    head, s_head = stream.run(x[:, :3])
    tail, _ = stream.run(x[:, 3:], s_head)
    assert np.array_equal(np.concatenate([head, tail], axis=1), want)
    per_op = model.stream(fused=False).run(x)
    assert np.abs(per_op[0] - want).max() <= 64 * np.finfo(np.float32).eps * max(1.0, np.abs(want).max())
    with pytest.raises(ValueError, match=r"x must have shape \(batch, length, 2\)"):
        stream.run(x[..., :1])
    with pytest.raises(ValueError, match=r"x contains 1 non-finite value"):
        stream.run(np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x))
    with pytest.raises(ValueError, match=r"state.ssm\[0\] must have shape \(4, 2, 16\)"):
        stream.run(x[:2], s_got)


def test_long_run_is_pipelined_and_still_the_step_loop(monkeypatch):
    # more steps than a pipeline chunk: ``run`` spreads the layers over Numba's threads (two stages
    # for the two layers here), chunks of 3 steps so that 20 steps make several handovers
    if numba.get_num_threads() < 2:
        pytest.skip("Numba has one thread here: the pipelined run is the serial one")
    from qs4d_np.models import stream_pack
    monkeypatch.setattr(stream_pack, "PIPELINE_CHUNK", 3)
    calls, pipelined = [], k.stream_steps_pipelined
    monkeypatch.setattr(stream_pack.k, "stream_steps_pipelined", lambda *args: calls.append(args[-2:]) or pipelined(*args))
    model, x = _model(np.float32, quant=QuantConfig(256, target_options=RUNNING), length=20)
    stream = model.stream()
    want, s_want = _stepped(stream, x)
    got, s_got = stream.run(x)
    assert calls == [(2, 3)] and np.array_equal(got, want)
    assert all(np.array_equal(a, b) for a, b in zip(s_got.ssm, s_want.ssm))
    with pytest.raises(ValueError, match=r"x contains 1 non-finite value"):
        stream.run(np.where(np.arange(x.size).reshape(x.shape) == 50, np.nan, x))


def test_fused_step_leaves_the_state_alone_and_takes_any_layout():
    model, x = _model(np.float64, quant=QuantConfig(256, target_options=RUNNING))
    stream = model.stream()
    _, state = _stepped(stream, x[:, :2])
    before = [s.copy() for s in state.ssm], state.pool_sum.copy()
    logits, new = stream.step(x[:, 2], state)
    assert all(np.array_equal(a, b) for a, b in zip(state.ssm, before[0]))
    assert np.array_equal(state.pool_sum, before[1]) and state.steps == 2 and new.steps == 3
    # a state in Fortran order (not what the kernel takes) is copied, with the same result
    fortran = type(state)(tuple(np.asfortranarray(s) for s in state.ssm), state.pool_sum, state.steps)
    assert np.array_equal(stream.step(x[:, 2], fortran)[0], logits)
    # int input is converted like the per-op path converts it
    ints = np.arange(3, dtype=np.int64).reshape(3, 1)
    assert np.array_equal(stream.step(ints, state)[0], model.stream(fused=False).step(ints, state)[0])


def test_fused_stream_raises_the_act_quantizers_error_on_overflow():
    model, _ = _model(np.float32, quant=QuantConfig(256, target_options=RUNNING))
    x_t = np.full((3, 1), 3e38, np.float32)  # finite, but the layers' products overflow
    errors = []
    for stream in (model.stream(), model.stream(fused=False)):
        with np.errstate(over="ignore"), pytest.raises(ValueError, match="the stream's values contain .* "
                                                                           "non-finite value") as info:
            stream.step(x_t, stream.initial_state(3))
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_batchnorm_eval_affine_is_its_evaluation_forward():
    bn = BatchNorm(5, dtype=np.float32)
    x = np.random.default_rng(4).standard_normal((7, 5)).astype(np.float32)
    bn.forward(x * 3 + 1, training=True)
    scale, shift = bn.eval_affine()
    assert scale.dtype == shift.dtype == np.float32
    assert np.array_equal(bn.forward(x), x * scale + shift)


def test_kernel_module_imports_nothing_above_the_kernels():
    tree = ast.parse(inspect.getsource(k))
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {n for n in names if n.startswith("qs4d_np")} <= {"qs4d_np.kernels.elementwise", "qs4d_np.kernels.fake_quant",
                                                             "qs4d_np.kernels.norm"}
