"""The integer golden SSM core: primitives, the int64 path against its Python-int twin,
agreement with the float computation it models, and the no-float guarantee."""
import ast
import inspect
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qs4d_np.golden import (IntFormat, SSMCore, quantize_multiplier, round_shift, saturate,
                            shared_shift_multipliers, ssm_core_multipliers)
from qs4d_np.golden import fixedpoint, layer
from qs4d_np.golden.fixedpoint import bits_needed, word_range
from qs4d_np.golden.multiplier import MAX_EPS
from qs4d_np.golden.testcase import TENSORS, random_ssm_case
from qs4d_np.quant.grids import make_grid
from reference.golden import rne_div_pow2, ssm_core_run

SETTINGS = settings(max_examples=40, deadline=None)


def rne_fraction(value: Fraction) -> int:
    """Round half to even from the exact rational (independent of any shift trick)."""
    floor = value.numerator // value.denominator
    rest = value - floor
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2):
        return floor + 1
    return floor


@SETTINGS
@given(st.lists(st.integers(-(1 << 62), (1 << 62) - 1), min_size=1, max_size=20),
       st.integers(0, 62))
def test_round_shift_is_round_half_even(values, shift):
    got = round_shift(np.array(values, dtype=np.int64), shift)
    assert got.dtype == np.int64
    want = [rne_fraction(Fraction(v, 1 << shift)) for v in values]
    assert got.tolist() == want == [rne_div_pow2(v, shift) for v in values]


def test_round_shift_ties_go_to_even():
    # 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 2.25, 2.75 in units of 1/4
    acc = np.array([10, 14, -10, -14, 2, -2, 9, 11], dtype=np.int64)
    assert round_shift(acc, 2).tolist() == [2, 4, -2, -4, 0, 0, 2, 3]


def test_saturate_clamps_and_flags():
    fmt = IntFormat.qs4d(16)  # [-8, 8] in 5 bits
    v, flags = saturate(np.array([-9, -8, 0, 8, 9, 100]), fmt)
    assert v.tolist() == [-8, -8, 0, 8, 8, 8] and flags.tolist() == [1, 0, 0, 0, 1, 1]


def test_grid_that_does_not_fit_the_width_is_refused():
    assert IntFormat.qs4d(256) == IntFormat(9, -128, 128)  # n = 2**b needs b + 1 bits
    with pytest.raises(ValueError, match=r"grid \[-128, 128\] needs 9 bits, but width 8"):
        IntFormat.qs4d(256, width=8)
    assert IntFormat.qs4d(3) == IntFormat(2, -2, 1)  # odd n floors -n/2
    with pytest.raises(ValueError, match="qmin <= qmax"):
        IntFormat(8, 3, 2)
    with pytest.raises(TypeError, match="u must be an integer numpy array"):
        IntFormat.full(8).check("u", np.zeros(3))
    with pytest.raises(ValueError, match=r"u has 1 value\(s\) outside its grid \[-8, 7\]"):
        IntFormat.full(4).check("u", np.array([0, 8]))
    with pytest.raises(ValueError, match=r"u has 1 value\(s\) outside its grid"):
        IntFormat.full(4).check("u", np.array([0, 2 ** 64 - 1], dtype=np.uint64))


def test_word_ranges_and_widths():
    assert word_range(8) == (-128, 127) and word_range(8, signed=False) == (0, 255)
    assert word_range(64, signed=False) == (0, 2 ** 64 - 1) and word_range(1) == (-1, 0)
    with pytest.raises(ValueError, match="width"):
        word_range(65)
    assert [bits_needed(*r) for r in ((0, 0), (-1, 0), (0, 1), (-128, 127), (-128, 128))] == [1, 1, 2, 8, 9]
    for n in (2, 3, 16, 255, 256):  # the golden grid is the QAT quantizers' grid
        g = make_grid("qs4d", n)
        assert IntFormat.qs4d(n) == IntFormat(g.bits, g.qmin, g.qmax)


@SETTINGS
@given(st.floats(2.0 ** -30, 2.0 ** 30))
def test_quantize_multiplier_is_normalised_and_accurate(ratio):
    m0, shift = quantize_multiplier(ratio)
    assert (1 << 30) <= m0 < (1 << 31) and 0 <= shift <= 62
    # M0 rounds q * 2**31 with q in [0.5, 1): relative error <= 2**-31
    assert abs(Fraction(m0, 1 << shift) - Fraction(ratio)) <= Fraction(ratio) * Fraction(1, 1 << 31)


def test_quantize_multiplier_exact_cases_and_errors():
    assert quantize_multiplier(1.0) == (1 << 30, 30)
    assert quantize_multiplier(0.75) == (3 << 29, 31)
    assert quantize_multiplier(1 - 2.0 ** -40) == (1 << 30, 30)  # rounds up to 2**31, renormalised
    with pytest.raises(ValueError, match="ratio must be > 0"):
        quantize_multiplier(0.0)
    with pytest.raises(ValueError, match="needs right shift"):
        quantize_multiplier(2.0 ** -40)


@SETTINGS
@given(st.lists(st.floats(2.0 ** -20, 2.0 ** 20), min_size=1, max_size=4),
       st.lists(st.integers(0, 40), min_size=4, max_size=4))
def test_shared_shift_is_as_precise_as_int64_allows(ratios, bound_bits):
    bounds = [(1 << b) - 1 for b in bound_bits[:len(ratios)]]  # b = 0: a term on a [0, 0] grid

    def fits(R):  # headroom at shift R and every multiplier an int64 word, computed exactly
        mults = [round(Fraction(r) * Fraction(2) ** R) for r in ratios]
        return sum(b * m for b, m in zip(bounds, mults)) < 1 << 63 and max(mults) < 1 << 63

    best = max((R for R in range(63) if fits(R)), default=None)
    if best is None or Fraction(sum(bounds), 1 << (best + 1)) > Fraction(1, 1 << 8):
        with pytest.raises(ValueError, match="may move the result by"):
            shared_shift_multipliers(ratios, bounds)
        return
    mults, shift = shared_shift_multipliers(ratios, bounds)
    assert shift == best and max(mults) < 1 << 63
    assert sum(b * m for b, m in zip(bounds, mults)) < 1 << 63
    for r, m in zip(ratios, mults):  # each multiplier within half a unit of ratio * 2**shift
        assert abs(Fraction(m) - Fraction(r) * (1 << shift)) <= Fraction(1, 2)


def test_shared_shift_bounds_the_multiplier_of_a_zero_bound_term():
    # term 0 lives on a [0, 0] grid (bound 0): the headroom sum ignores it, but its
    # multiplier is still stored as an int64 word, so it must stay below 2**63
    mults, shift = shared_shift_multipliers([1e3, 1.0], [0, 1])
    assert max(mults) < 1 << 63 and shift == 53  # 1000 * 2**53 < 2**63 <= 1000 * 2**54
    assert mults == [round(Fraction(1000) * 2 ** 53), 1 << 53]
    np.array(mults, dtype=np.int64)  # storable
    with pytest.raises(ValueError, match=r"fit no shift in \[0, 62\]: even at shift 0 the multipliers "
                                         r"reach 1180591620717411303424 "):
        shared_shift_multipliers([2.0 ** 70, 1.0], [0, 1])


def test_shared_shift_keeps_small_ratio_terms_precise():
    # Abar*x (large integers, small ratio) next to Bbar*u (small integers, large
    # ratio): normalising the shift to the largest ratio would leave Abar's
    # multiplier ~7 bits; the headroom shift keeps the error far below an LSB.
    mults, shift = shared_shift_multipliers([2.0 ** -10, 2.0 ** 13], [2 ** 25, 2])
    assert abs(Fraction(mults[0], 1 << shift) - Fraction(2.0 ** -10)) * 2 ** 25 < Fraction(1, 1 << 20)
    with pytest.raises(ValueError, match=r"fit no shift .* accumulator bound 9223372036854775808 "):
        shared_shift_multipliers([1.0, 1.0], [2 ** 62, 2 ** 62])
    with pytest.raises(ValueError, match="may move the result by"):
        shared_shift_multipliers([1.0, 1.0], [2 ** 40, 2 ** 40])


widths = st.fixed_dictionaries({k: st.integers(2, 16) for k in TENSORS})


@st.composite
def cases(draw, max_len=6):
    return dict(widths=draw(widths), H=draw(st.integers(1, 3)), N2=draw(st.integers(1, 3)),
                batch=draw(st.integers(1, 2)), length=draw(st.integers(1, max_len)),
                edge=draw(st.sampled_from([0.0, 0.3, 1.0])), grid=draw(st.sampled_from(["full", "qs4d"])),
                dyadic=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 32 - 1)))


def run_case(case):
    case = dict(case)
    core, u = random_ssm_case(case.pop("seed"), case.pop("widths"), **case)
    return core, u, core.run(u)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_int64_core_matches_python_int_twin(case):
    core, u, trace = run_case(case)
    p = {k: v.tolist() for k, v in core.arrays().items()}
    f = core.formats
    twin = ssm_core_run(p, u.tolist(), (f.x.qmin, f.x.qmax), (f.y.qmin, f.y.qmax))
    for key, want in twin.items():
        got = getattr(trace, key)
        assert got.dtype == np.int64
        assert got.tolist() == want, key


def test_int64_core_at_the_widest_grid_edges_matches_twin():
    # Every tensor 16 bits, every word at qmin/qmax: the largest products the
    # spec allows; agreement with unbounded ints shows int64 never wrapped.
    case = dict(widths={k: 16 for k in TENSORS}, H=2, N2=4, batch=2, length=8, edge=1.0,
                grid="full", seed=7)
    core, u, trace = run_case(case)
    f = core.formats
    twin = ssm_core_run({k: v.tolist() for k, v in core.arrays().items()}, u.tolist(),
                        (f.x.qmin, f.x.qmax), (f.y.qmin, f.y.qmax))
    assert trace.x_re.tolist() == twin["x_re"] and trace.y.tolist() == twin["y"]
    assert sum(trace.saturation_counts().values()) > 0  # the edges really were hit


def test_saturation_counts_count_clamped_words():
    core, u, trace = run_case(dict(widths={k: 6 for k in TENSORS}, H=2, N2=2, batch=1, length=20,
                                   edge=1.0, grid="full", seed=3))
    counts = trace.saturation_counts()
    assert counts["x_re"] == int(trace.sat_x_re.sum()) > 0
    assert counts["y"] == int(trace.sat_y.sum())
    # a clamped word sits on the grid edge
    assert set(np.unique(trace.x_re[trace.sat_x_re == 1])) <= {core.formats.x.qmin, core.formats.x.qmax}


def check_step_against_float(case, seed, pow2_steps):
    """One state step against the float fake-quant computation it models.

    In float64 with real steps: x' = clamp(rint(Re/Im(Abar_hat*x_hat + Bbar_hat*u_hat) / s_x_re/im)),
    each hat = step * integer. The integer path replaces each exact ratio r_k
    by M_k / 2**r_x, so the two may differ only where the exact value lies
    within eps = sum_k |T_k| * |r_k - M_k/2**r_x| (plus float64 rounding) of a
    rounding boundary, and there by one LSB (docs/integer_spec.md, section 6).
    With power-of-two steps both sides are exact (eps = 0, ties are real
    ties) and must agree everywhere: RNE = np.rint on every tie.
    """
    core, u, trace = run_case(case)
    rng = np.random.default_rng(seed)
    f, H, N2 = core.formats, core.H, core.N2

    def step(shape, width):
        factor = 2.0 ** -rng.integers(0, 2, shape) if pow2_steps else rng.uniform(0.5, 1.0, shape)
        return factor * 2.0 ** -(width - 1)

    s = {"s_Abar_re": step((H, N2), f.Abar.width), "s_Abar_im": step((H, N2), f.Abar.width),
         "s_Bbar_re": step((H, N2), f.Bbar.width), "s_Bbar_im": step((H, N2), f.Bbar.width),
         "s_u": step(H, f.u.width), "s_x_re": step(H, f.x.width), "s_x_im": step(H, f.x.width)}
    ones = np.ones(H)
    arrays = {**core.arrays(), **ssm_core_multipliers(f, s_y=ones, s_C_re=ones, s_C_im=ones, s_D=ones,
                                                      H=H, N2=N2, **s)}
    core2 = SSMCore(f, **arrays)
    x_re, x_im = trace.x_re[:, 0], trace.x_im[:, 0]
    u1 = u[:, min(1, u.shape[1] - 1)]
    new_re, new_im, *_ = core2.step(x_re, x_im, u1)

    sx_re, sx_im, su = s["s_x_re"][:, None], s["s_x_im"][:, None], s["s_u"][:, None]
    Abar = s["s_Abar_re"] * core2.Abar_re + 1j * s["s_Abar_im"] * core2.Abar_im
    Bbar = s["s_Bbar_re"] * core2.Bbar_re + 1j * s["s_Bbar_im"] * core2.Bbar_im
    v = Abar * (sx_re * x_re + 1j * sx_im * x_im) + Bbar * (su * u1[:, :, None])
    u_n = u1[:, :, None]
    checks = [
        (v.real / sx_re, new_re,
         [(core2.Abar_re * x_re, s["s_Abar_re"], "m_a_re"),
          (core2.Abar_im * x_im, s["s_Abar_im"] * sx_im / sx_re, "m_a_im_to_re"),
          (core2.Bbar_re * u_n, s["s_Bbar_re"] * su / sx_re, "m_b_re")]),
        (v.imag / sx_im, new_im,
         [(core2.Abar_re * x_im, s["s_Abar_re"], "m_a_re"),
          (core2.Abar_im * x_re, s["s_Abar_im"] * sx_re / sx_im, "m_a_im_to_im"),
          (core2.Bbar_im * u_n, s["s_Bbar_im"] * su / sx_im, "m_b_im")])]
    ties = 0
    for exact, got, terms in checks:
        ties += int(np.count_nonzero(exact - np.floor(exact) == 0.5))
        want = np.clip(np.rint(exact), f.x.qmin, f.x.qmax)
        eps = sum(np.abs(T) * np.abs(r - arrays[m] / 2.0 ** arrays["r_x"]) for T, r, m in terms)
        # the premise of the one-LSB bound: the export keeps the multiplier error
        # (computed here from the actual words, not the grid bounds) <= MAX_EPS < 1/2
        assert eps.max() <= MAX_EPS
        eps = eps + 1e-9 * (1 + sum(np.abs(T) * r for T, r, _ in terms))  # float64 rounding of v
        diff = np.abs(got - want)
        if pow2_steps:
            assert diff.max() == 0
        assert diff.max() <= 1
        near_tie = np.abs(np.abs(exact - np.floor(exact)) - 0.5) <= eps
        assert np.all(near_tie[diff == 1])
    return ties


@settings(max_examples=40, deadline=None)
@given(cases(max_len=4), st.integers(0, 2 ** 32 - 1), st.booleans())
def test_one_step_agrees_with_float_fake_quant_within_bound(case, seed, pow2_steps):
    check_step_against_float(case, seed, pow2_steps)


def test_one_step_bound_regression_narrow_input_wide_state():
    # The case that once failed with a two-LSB difference: u and Bbar narrow,
    # Abar and x wide. A shift normalised to the largest ratio (Bbar * u) left
    # Abar * x's multiplier ~7 bits, so multiplier rounding moved a 2**30-sized
    # term by more than one LSB; the headroom shift keeps eps <= MAX_EPS.
    case = dict(widths={"u": 5, "Abar": 15, "Bbar": 4, "C": 8, "D": 2, "x": 16, "y": 13}, H=3, N2=3,
                batch=2, length=4, edge=0.0, grid="qs4d", dyadic=False, seed=1863057435)
    check_step_against_float(case, 3611811965, False)


def test_exact_ties_round_like_np_rint():
    # Narrow Abar/Bbar/u grids with power-of-two steps make exact ties common.
    widths = dict(zip(TENSORS, (3, 3, 3, 8, 8, 8, 12)))
    ties = sum(check_step_against_float(dict(widths=widths, H=3, N2=3, batch=2, length=2, edge=0.3,
                                             grid="full", dyadic=True, seed=seed), seed, True)
               for seed in range(5))
    assert ties > 10


INTEGER_MODULES = (fixedpoint, layer)
FLOAT_NAMES = {"float", "float16", "float32", "float64", "floating", "mean", "sqrt", "exp", "log",
               "divide", "true_divide", "rint", "round", "around", "floor", "ceil", "math", "random"}


@pytest.mark.parametrize("module", INTEGER_MODULES, ids=lambda m: m.__name__)
def test_integer_path_has_no_float_operation(module):
    """The run path's modules contain no float literal, no true division and no float-making call."""
    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):
        assert not (isinstance(node, ast.Constant) and isinstance(node.value, float)), ast.dump(node)
        assert not isinstance(node, ast.Div), f"{module.__name__} uses true division"
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        assert name not in FLOAT_NAMES, f"{module.__name__} line {node.lineno}: {name}"


def test_float_inputs_are_refused_and_every_trace_array_is_int64():
    core, u, trace = run_case(dict(widths={k: 8 for k in TENSORS}, H=2, N2=2, batch=1, length=3,
                                   edge=0.3, grid="qs4d", seed=1))
    for value in vars(trace).values():
        assert value.dtype == np.int64
    for value in core.arrays().values():
        assert value.dtype == np.int64
    with pytest.raises(TypeError, match="u must be an integer numpy array, got float64"):
        core.run(u.astype(np.float64))
    arrays = core.arrays()
    arrays["Abar_re"] = arrays["Abar_re"].astype(np.float32)
    with pytest.raises(TypeError, match="Abar_re must be an integer numpy array"):
        SSMCore(core.formats, **arrays)
    arrays = core.arrays()
    arrays["m_c_re"] = arrays["m_c_re"].astype(np.float64)
    with pytest.raises(TypeError, match="m_c_re must be an integer numpy array"):
        SSMCore(core.formats, **arrays)


def test_bad_core_arguments_name_the_argument():
    core, u, _ = run_case(dict(widths={k: 8 for k in TENSORS}, H=2, N2=3, batch=1, length=3,
                               edge=0.0, grid="full", seed=2))
    arrays = core.arrays()
    with pytest.raises(ValueError, match=r"C_im must have shape \(2, 3\), got \(3, 2\)"):
        SSMCore(core.formats, **{**arrays, "C_im": arrays["C_im"].T.copy()})
    with pytest.raises(ValueError, match=r"D has 1 value\(s\) outside its grid \[-128, 127\]"):
        SSMCore(core.formats, **{**arrays, "D": np.array([0, 128])})
    with pytest.raises(TypeError, match=r"missing \['r_y'\]"):
        SSMCore(core.formats, **{k: v for k, v in arrays.items() if k != "r_y"})
    with pytest.raises(ValueError, match=r"multipliers must lie in \[0, 2\*\*63\)"):
        SSMCore(core.formats, **{**arrays, "m_d": np.full(2, -1)})
    with pytest.raises(ValueError, match="shift must lie in"):
        SSMCore(core.formats, **{**arrays, "r_x": np.full((2, 3), 63)})
    wide = core.formats.__class__(**{**vars(core.formats), "x": IntFormat.full(32), "Abar": IntFormat.full(32)})
    with pytest.raises(ValueError, match=r"state \(x_re\) accumulator needs up to \d+ bits"):
        SSMCore(wide, **{**arrays, "m_a_re": np.full((2, 3), (1 << 40))})
    with pytest.raises(ValueError, match=r"u must have shape \(batch, length, 2\), got \(1, 3, 4\)"):
        core.run(np.zeros((1, 3, 4), dtype=np.int64))
