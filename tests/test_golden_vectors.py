""".memh test vectors and the dump comparison: format, round trips, clear errors."""
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qs4d_np.golden import compare_dumps, read_memh, read_ssm_vectors, write_memh, write_ssm_vectors
from qs4d_np.golden.testcase import TENSORS, random_ssm_case


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 32), st.booleans(), st.data())
def test_memh_round_trip(tmp_path_factory, width, signed, data):
    lo, hi = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
    values = np.array(data.draw(st.lists(st.integers(lo, hi) | st.sampled_from([lo, hi]),
                                         min_size=0, max_size=30)), dtype=np.int64)
    path = tmp_path_factory.mktemp("memh") / "v.memh"
    write_memh(path, values, width, signed=signed)
    lines = path.read_text().splitlines()
    assert all(len(line) == (width + 3) // 4 for line in lines)
    back = read_memh(path, width, values.size, signed=signed)
    assert back.dtype == np.int64 and back.tolist() == values.tolist()


def test_memh_words_are_twos_complement_with_fixed_digits(tmp_path):
    write_memh(tmp_path / "a.memh", np.array([-1, 0, 5, -32, 31]), 6)
    assert (tmp_path / "a.memh").read_text() == "3f\n00\n05\n20\n1f\n"
    write_memh(tmp_path / "b.memh", np.array([-(1 << 31), (1 << 31) - 1]), 32)
    assert (tmp_path / "b.memh").read_text() == "80000000\n7fffffff\n"


def test_memh_write_errors(tmp_path):
    with pytest.raises(ValueError, match=r"w.memh has 1 value\(s\) outside a signed 6-bit word \[-32, 31\] "
                                         r"\(first: flat index 1 = 32"):
        write_memh(tmp_path / "w.memh", np.array([0, 32]), 6)
    # the range is checked before any int64 cast: 2**64 - 1 must not wrap to -1 (= "ff")
    with pytest.raises(ValueError, match=r"outside a signed 8-bit word \[-128, 127\] \(first: flat index 0 "
                                         r"= 18446744073709551615"):
        write_memh(tmp_path / "u.memh", np.array([2 ** 64 - 1], dtype=np.uint64), 8)
    assert not (tmp_path / "u.memh").exists()
    # a uint64 word that fits is written as is
    write_memh(tmp_path / "u.memh", np.array([255, 2 ** 63], dtype=np.uint64), 64, signed=False)
    assert (tmp_path / "u.memh").read_text() == "00000000000000ff\n8000000000000000\n"
    with pytest.raises(TypeError, match="must be an integer numpy array"):
        write_memh(tmp_path / "w.memh", np.array([0.5]), 6)
    with pytest.raises(FileNotFoundError, match="no such vector file"):
        read_memh(tmp_path / "missing.memh", 6, 1)


@pytest.mark.parametrize("text, count, message", [
    ("01\n0g\n02\n", 3, r"w.memh:2: expected a 2-digit hex word, got '0g'"),
    ("01\n1\n", 2, r"w.memh:2: expected a 2-digit hex word, got '1'"),
    ("01\n40\n", 2, r"w.memh:2: word 40 does not fit 6 bits"),
    ("01\n02\n", 3, r"w.memh: expected 3 words, found 2 \(it ends after line 2, truncated\?\)"),
    ("01\n02\n", 1, r"w.memh:2: expected 1 words, this is word 2 \(extra\)"),
    ("01\n\n", 2, r"w.memh: expected 2 words, found 1 \(it ends after line 1"),
    ("// dump\n01 // first\n\n@2\n02\n", 3, r"w.memh:4: address '@2' does not name the next word \(1\)"),
    ("01\n@zz\n02\n", 2, r"w.memh:2: address '@zz' does not name"),
    ("01\n/* c */ 02\n", 2, r"w.memh:2: expected a 2-digit hex word, got '/\* c \*/ 02'"),
])
def test_memh_read_errors_name_file_and_line(tmp_path, text, count, message):
    (tmp_path / "w.memh").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_memh(tmp_path / "w.memh", 6, count)


def test_memh_reads_comments_blank_lines_and_sequential_addresses_like_readmemh(tmp_path):
    # what $writememh and RTL dumpers write: a header comment, @addr lines, trailing comments
    (tmp_path / "w.memh").write_text("// dump of y\n@0\n3f // -1\n\n00\n@2\n1f\n   \n@00000003\n20\n")
    assert read_memh(tmp_path / "w.memh", 6, 4).tolist() == [-1, 0, 31, -32]


def make_vectors(tmp_path, seed=5):
    core, u = random_ssm_case(seed, {k: w for k, w in zip(TENSORS, (8, 9, 7, 6, 5, 12, 10))},
                              H=3, N2=2, batch=2, length=5, edge=0.3, grid="qs4d")
    trace = core.run(u)
    return core, u, trace, write_ssm_vectors(tmp_path / "vec", core, u, trace)


def test_vector_directory_round_trip(tmp_path):
    core, u, trace, vec = make_vectors(tmp_path)
    core2, u2, config = read_ssm_vectors(vec)
    assert np.array_equal(u2, u) and config["H"] == 3 and config["N2"] == 2
    for name, value in core.arrays().items():
        assert np.array_equal(getattr(core2, name), value), name
    trace2 = core2.run(u2)
    assert np.array_equal(trace2.y, trace.y) and np.array_equal(trace2.x_im, trace.x_im)


def copy_outputs(vec, rtl):
    rtl.mkdir()
    for name in ("x_re", "x_im", "y", "sat_x_re", "sat_x_im", "sat_y"):
        shutil.copy(vec / f"{name}.memh", rtl / f"{name}.memh")


def test_compare_finds_exactly_the_corrupted_word(tmp_path):
    core, u, trace, vec = make_vectors(tmp_path)
    rtl = tmp_path / "rtl"
    copy_outputs(vec, rtl)
    report = compare_dumps(vec, rtl)
    assert report.ok and report.words == 2 * (2 * 5 * 3 * 2) * 2 + 2 * (2 * 5 * 3)
    # corrupt x_im at batch 1, step 3, channel 2, mode 1 by +3 LSB
    flat = ((1 * 5 + 3) * 3 + 2) * 2 + 1
    got = trace.x_im.copy()
    got[1, 3, 2, 1] += 3 if got[1, 3, 2, 1] + 3 <= core.formats.x.qmax else -3
    write_memh(rtl / "x_im.memh", got, core.formats.x.width)
    assert np.count_nonzero(got.ravel() != trace.x_im.ravel()) == 1 and got.ravel()[flat] != trace.x_im.ravel()[flat]
    report = compare_dumps(vec, rtl)
    assert len(report.mismatches) == 1
    m = report.mismatches[0]
    assert (m.layer, m.tensor, m.index) == (0, "x_im", {"batch": 1, "step": 3, "channel": 2, "mode": 1})
    assert (m.expected, m.got) == (int(trace.x_im[1, 3, 2, 1]), int(got[1, 3, 2, 1]))
    assert abs(m.diff_lsb) == 3
    assert "layer 0 x_im [batch 1, step 3, channel 2, mode 1]" in str(report)


def test_compare_names_a_truncated_or_malformed_dump(tmp_path):
    _, _, _, vec = make_vectors(tmp_path)
    rtl = tmp_path / "rtl"
    copy_outputs(vec, rtl)
    lines = (rtl / "y.memh").read_text().splitlines()
    (rtl / "y.memh").write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(ValueError, match=r"rtl/y.memh: expected 30 words, found 28 "):
        compare_dumps(vec, rtl)
    lines[4] = "xx" + lines[4][2:]
    (rtl / "y.memh").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"rtl/y.memh:5: expected a 3-digit hex word"):
        compare_dumps(vec, rtl)


def snapshot(directory):
    """Every file under ``directory`` (relative path -> bytes)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def crash_after(monkeypatch, module, files):
    """Make ``module.write_memh`` raise after ``files`` successful writes (a simulated crash)."""
    real, done = module.write_memh, []

    def writer(path, *args, **kwargs):
        if len(done) == files:
            raise OSError("simulated crash mid-export")
        real(path, *args, **kwargs)
        done.append(path)

    monkeypatch.setattr(module, "write_memh", writer)
    return done


def test_interrupted_reexport_leaves_the_previous_export_intact(tmp_path, monkeypatch):
    from qs4d_np.golden import vectors
    _, _, _, vec = make_vectors(tmp_path, seed=5)
    before = snapshot(vec)
    core, u = random_ssm_case(6, {k: w for k, w in zip(TENSORS, (8, 9, 7, 6, 5, 12, 10))},
                              H=3, N2=2, batch=2, length=5, edge=0.3, grid="qs4d")
    trace = core.run(u)
    written = crash_after(monkeypatch, vectors, 4)
    with pytest.raises(OSError, match="simulated crash"):
        write_ssm_vectors(vec, core, u, trace)
    assert len(written) == 4
    assert snapshot(vec) == before  # old config next to old .memh only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vec"]  # the staged copy is gone
    monkeypatch.undo()
    write_ssm_vectors(vec, core, u, trace)
    core2, u2, _ = read_ssm_vectors(vec)
    assert np.array_equal(u2, u) and np.array_equal(core2.Abar_re, core.Abar_re)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vec"]


def test_export_refuses_to_replace_foreign_files(tmp_path):
    core, u, trace, vec = make_vectors(tmp_path)
    user = tmp_path / "notes"
    user.mkdir()
    (user / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"notes is not empty and is not a vector export; refusing to replace it "
                                         r".*neither manifest.json nor config.json"):
        write_ssm_vectors(user, core, u, trace)
    assert snapshot(user) == {"todo.txt": b"keep me"}
    # a previous export with a simulator dump inside: re-exporting would delete the dump
    copy_outputs(vec, vec / "rtl")
    before = snapshot(vec)
    with pytest.raises(ValueError, match=r"vec holds a previous export and 6 other file\(s\) \(rtl/sat_x_im.memh, "
                                         r"rtl/sat_x_re.memh, rtl/sat_y.memh, rtl/x_im.memh, rtl/x_re.memh and 1 more\)"):
        write_ssm_vectors(vec, core, u, trace)
    assert snapshot(vec) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        write_ssm_vectors(tmp_path / "file", core, u, trace)
    (tmp_path / "empty").mkdir()
    assert read_ssm_vectors(write_ssm_vectors(tmp_path / "empty", core, u, trace))[2]["H"] == 3
