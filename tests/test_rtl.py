"""The Verilog SSM core against the golden model, bit for bit (Icarus Verilog 11, cocotb 2.x).

Skipped with the reason when iverilog (or, for the cocotb tests, cocotb) is
missing; CI installs both (.ci/run).
"""
import json
import shutil

import numpy as np
import pytest
from hypothesis import Phase, example, given, settings, strategies as st

from qs4d_np.golden import compare_dumps, read_memh, write_memh, write_ssm_vectors
from qs4d_np.golden.testcase import TENSORS, random_ssm_case
from validation.sim import missing_tools, run_cocotb, run_testbench

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools()))
needs_cocotb = pytest.mark.skipif(missing_tools(cocotb=True) is not None,
                                  reason=str(missing_tools(cocotb=True)))


@st.composite
def cases(draw, max_len=8):
    return dict(widths=draw(st.fixed_dictionaries({k: st.integers(2, 16) for k in TENSORS})),
                H=draw(st.integers(1, 3)), N2=draw(st.integers(1, 3)), batch=draw(st.integers(1, 2)),
                length=draw(st.integers(1, max_len)), edge=draw(st.sampled_from([0.0, 0.3, 1.0])),
                grid=draw(st.sampled_from(["full", "qs4d"])), dyadic=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 32 - 1)))


def export(directory, case):
    case = dict(case)
    core, u = random_ssm_case(case.pop("seed"), case.pop("widths"), **case)
    trace = core.run(u)
    return core, trace, write_ssm_vectors(directory, core, u, trace)


EDGE_CASES = [dict(widths={k: w for k in TENSORS}, H=2, N2=3, batch=2, length=8, edge=1.0, grid=grid, seed=w)
              for w, grid in ((16, "full"), (2, "full"), (16, "qs4d"))]


@settings(max_examples=30, deadline=None)
@given(cases())
@example(EDGE_CASES[0])
@example(EDGE_CASES[1])
@example(EDGE_CASES[2])
def test_verilog_testbench_agrees_bit_exactly(tmp_path_factory, case):
    _, _, vec = export(tmp_path_factory.mktemp("vec"), case)
    proc = run_testbench(vec)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = case["batch"] * case["length"]
    assert f"tb_s4d_ssm_core: {steps} steps passed, 0 steps failed" in proc.stdout
    report = compare_dumps(vec, vec / "rtl")
    assert report.ok and report.words > 0, str(report)


def saturating_case(directory):
    """A case whose state saturates (all words at the grid edges, narrow state)."""
    widths = dict(zip(TENSORS, (8, 8, 8, 8, 8, 6, 8)))
    case = dict(widths=widths, H=2, N2=2, batch=2, length=6, edge=1.0, grid="qs4d", seed=11)
    core, trace, vec = export(directory, case)
    assert trace.saturation_counts()["x_re"] > 0
    return core, trace, vec


def test_corrupted_expected_word_fails_the_testbench_and_compare_finds_it(tmp_path):
    core, trace, vec = saturating_case(tmp_path / "vec")
    assert run_testbench(vec).returncode == 0
    # corrupt y at batch 1, step 4, channel 0 by one LSB in the expected file
    want = trace.y.copy()
    want[1, 4, 0] += 1 if want[1, 4, 0] < core.formats.y.qmax else -1
    write_memh(vec / "y.memh", want, core.formats.y.width)
    proc = run_testbench(vec)
    assert proc.returncode != 0
    assert "MISMATCH y batch 1 step 4 channel 0" in proc.stdout
    assert "1 steps failed, 1 word mismatches" in proc.stdout
    report = compare_dumps(vec, vec / "rtl")
    assert [(m.tensor, m.index, m.expected, m.got) for m in report.mismatches] == [
        ("y", {"batch": 1, "step": 4, "channel": 0}, int(want[1, 4, 0]), int(trace.y[1, 4, 0]))]


def test_corrupted_rtl_dump_word_is_found_exactly(tmp_path):
    core, trace, vec = saturating_case(tmp_path / "vec")
    assert run_testbench(vec).returncode == 0
    shape = trace.x_re.shape
    dump = read_memh(vec / "rtl" / "x_re.memh", core.formats.x.width, trace.x_re.size).reshape(shape)
    assert np.array_equal(dump, trace.x_re)
    dump[0, 5, 1, 0] = core.formats.x.qmin if dump[0, 5, 1, 0] != core.formats.x.qmin else 0
    write_memh(vec / "rtl" / "x_re.memh", dump, core.formats.x.width)
    report = compare_dumps(vec, vec / "rtl")
    assert len(report.mismatches) == 1
    m = report.mismatches[0]
    assert (m.tensor, m.index) == ("x_re", {"batch": 0, "step": 5, "channel": 1, "mode": 0})
    assert m.diff_lsb == int(dump[0, 5, 1, 0]) - int(trace.x_re[0, 5, 1, 0]) != 0


def test_truncated_vector_file_is_named(tmp_path):
    _, _, vec = saturating_case(tmp_path / "vec")
    assert run_testbench(vec).returncode == 0
    lines = (vec / "rtl" / "sat_y.memh").read_text().splitlines()
    (vec / "rtl" / "sat_y.memh").write_text("\n".join(lines[:5]) + "\n")
    with pytest.raises(ValueError, match=r"rtl/sat_y.memh: expected 24 words, found 5 "):
        compare_dumps(vec, vec / "rtl")


# Each cocotb run starts a simulator with an embedded Python that imports
# qs4d_np (several seconds), so few examples and no shrinking.
@needs_cocotb
@settings(max_examples=2, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(cases(max_len=5))
@example(EDGE_CASES[0])
def test_cocotb_drives_the_core_with_the_golden_model(tmp_path_factory, case):
    _, _, vec = export(tmp_path_factory.mktemp("vec"), case)
    assert run_cocotb(vec, vec / "build") == (1, 0)


@needs_cocotb
def test_cocotb_catches_a_wrong_clamp(tmp_path):
    # RTL built with a state grid one step narrower than the golden model's:
    # the saturated words must be reported.
    core, _, vec = saturating_case(tmp_path / "vec")
    fmt = core.formats.x
    assert run_cocotb(vec, tmp_path / "build", override={"X_MIN": fmt.qmin + 1, "X_MAX": fmt.qmax - 1}) == (1, 1)


# The reference core with one rule broken: the tie rule (round half up) or the clamp (one below
# the upper rail). Text mutations of validation/rtl/s4d_ssm_core.v, checked to apply.
MUTANTS = {"round half up": ("((rem == half) && floor_q[0])", "(rem == half)"),
           "clamp off by one": ("localparam signed [W_IN-1:0] HI = QMAX;",
                                "localparam signed [W_IN-1:0] HI = QMAX - 1;")}


@pytest.fixture(scope="module")
def stress_bundle(tmp_path_factory):
    from qs4d_np.golden.bundle import export_bundle
    from test_golden_model import build
    _, im, x = build(0)
    out = tmp_path_factory.mktemp("rtl") / "vec"
    export_bundle(im, x, out, stress=16)
    return out


def test_sim_py_runs_a_bundle_layer_and_reports_it(stress_bundle, tmp_path, capsys):
    from validation.sim import main
    assert main([str(stress_bundle), "--layer", "1", "--work", str(tmp_path / "core1")]) == 0
    out = capsys.readouterr().out
    assert "tb_s4d_ssm_core: 36 steps passed, 0 steps failed" in out and "the RTL agrees bit for bit" in out
    assert main([str(stress_bundle / "stress"), "--layer", "0", "--work", str(tmp_path / "s0")]) == 0
    assert main([str(stress_bundle), "--layer", "2", "--work", str(tmp_path / "x")]) == 1
    assert "--layer 2: " in capsys.readouterr().err
    assert main([str(stress_bundle), "--layer", "0", "--work", str(tmp_path / "t"), "--timeout", "0.001"]) == 2
    assert "did not finish within --timeout 0.001 s" in capsys.readouterr().err


@pytest.mark.parametrize("mutant", MUTANTS)
def test_a_broken_rounding_or_clamp_rule_fails_on_the_stress_vectors(stress_bundle, tmp_path, mutant):
    from validation.sim import CORE_SOURCES, bundle_core_vectors
    old, new = MUTANTS[mutant]
    source = CORE_SOURCES[0].read_text()
    assert source.count(old) == 1
    core = tmp_path / "mutant.v"
    core.write_text(source.replace(old, new))
    events = json.loads((stress_bundle / "stress" / "manifest.json").read_text())["events"]
    failed = []
    for layer in (0, 1):
        assert all(events[f"layers.{layer}.{t}"]["ties_odd"] and events[f"layers.{layer}.{t}"]["sat_high"]
                   for t in ("x_re", "x_im", "y"))
        vec = bundle_core_vectors(stress_bundle / "stress", layer, tmp_path / f"s{layer}")
        assert run_testbench(vec).returncode == 0  # the reference core passes
        proc = run_testbench(vec, core=core)
        failed.append(proc.returncode != 0 and "MISMATCH" in proc.stdout)
    assert failed == [True, True]


@pytest.fixture(scope="module")
def block_bundles(tmp_path_factory):
    """Bundles (with stress) of the three block kinds: BatchNorm post, residual (+ norm), no post op."""
    from qs4d_np.golden.bundle import export_bundle
    from test_golden_model import build
    out = {}
    for kind, kw in (("batch", {}), ("residual", {"residual": True}), ("none", {"norm": None})):
        _, im, x = build(2, **kw)
        assert (im.layers[0].post is None) == (kind == "none")
        out[kind] = tmp_path_factory.mktemp(kind) / "vec"
        export_bundle(im, x, out[kind], stress=16)
    return out


@pytest.mark.parametrize("kind", ["batch", "residual", "none"])
def test_whole_layer_rtl_is_bit_exact_through_valid_ready(block_bundles, tmp_path, kind):
    from validation.sim import layer_vectors, run_layer_testbench
    bundle = block_bundles[kind]
    for k, (source, layer) in enumerate(((bundle, 0), (bundle / "stress", 1))):
        vec = layer_vectors(source, layer, tmp_path / f"l{k}")
        proc = run_layer_testbench(vec, seed=k + 1)
        assert proc.returncode == 0 and "steps handed through" in proc.stdout, proc.stdout + proc.stderr
        report = compare_dumps(vec, vec / "rtl")
        assert report.ok and report.words > 0, report.summary()


def test_whole_layer_rtl_with_a_broken_tie_rule_fails_on_the_stress_vectors(block_bundles, tmp_path):
    from validation.sim import CORE_SOURCES, layer_vectors, run_layer_testbench
    old, new = MUTANTS["round half up"]
    mutant = tmp_path / "mutant.v"
    mutant.write_text(CORE_SOURCES[0].read_text().replace(old, new))
    vec = layer_vectors(block_bundles["residual"] / "stress", 1, tmp_path / "l")
    assert run_layer_testbench(vec, core=mutant).returncode == 0  # it runs; the words differ
    report = compare_dumps(vec, vec / "rtl")
    assert not report.ok
    # the broken rule shows past the core too (mixing, GLU, post round with the same module)
    assert {m.tensor for m in report.mismatches} & {"za", "zb", "act", "out"}


@needs_cocotb
def test_cocotb_drives_the_whole_layer_through_valid_ready(block_bundles, tmp_path):
    from validation.sim import layer_vectors, run_cocotb_layer
    vec = layer_vectors(block_bundles["residual"] / "stress", 1, tmp_path / "l")
    assert run_cocotb_layer(vec, tmp_path / "build", seed=5) == (1, 0)
