"""Stress vectors, the tie rule in every implementation, the accumulator trace and compare's
dataflow order (docs/integer_spec.md, sections 2.1 and 7)."""
import copy
import json
import shutil

import numpy as np
import pytest

from qs4d_np.golden import compare_dumps, round_shift
from qs4d_np.golden.bundle import export_bundle
from qs4d_np.golden.fast import _rne_sat, run_fast
from qs4d_np.golden.fixedpoint import IntFormat, rounding_events
from qs4d_np.golden.stress import EVENTS, stress_case

from reference.golden import model_run, rne_div_pow2
from test_golden_model import build

# Exact ties (2q + 1) / 2 in units of 2**-R, for floors q of both parities and signs, and every
# shift class: 1 (no bits below the half), small, and the largest the spec allows.
TIES = [(q, R) for q in (-4, -3, -1, 0, 1, 2, 5, 6, 1 << 20, -(1 << 20) - 1) for R in (1, 2, 7, 31, 40)
        if abs(2 * q + 1) << (R - 1) < 1 << 62] + [(0, 62), (-1, 62), (1 << 30, 31)]


def tie_cases():
    acc = [(2 * q + 1) << (R - 1) for q, R in TIES]
    want = [q + (q & 1) for q, _ in TIES]  # half to even: an odd floor rounds up, an even one stays
    return acc, [R for _, R in TIES], want


IMPLEMENTATIONS = {
    "numpy round_shift": lambda a, r: int(round_shift(np.array([a], dtype=np.int64), r)[0]),
    "numba kernel _rne_sat": lambda a, r: int(_rne_sat(np.int64(a), np.int64(r), np.int64(-(1 << 62)),
                                                       np.int64(1 << 62))[0]),
    "python-int twin": rne_div_pow2,
}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=str)
def test_every_implementation_rounds_exact_ties_to_even(impl):
    acc, shifts, want = tie_cases()
    got = [IMPLEMENTATIONS[impl](a, r) for a, r in zip(acc, shifts)]
    assert got == want
    # one unit either side of the tie rounds to the nearest, whatever the parity
    assert [IMPLEMENTATIONS[impl](a + 1, r) for a, r in zip(acc, shifts)] == [q + 1 for q, _ in TIES]
    assert [IMPLEMENTATIONS[impl](a - 1, r) for a, r in zip(acc, shifts)] == [q for q, _ in TIES]


def test_numba_kernel_clamps_after_rounding_and_flags():
    # 2.5 -> 2 on [-2, 2]: a tie that lands on the rail is not clamped; 3.5 -> 4 is (flag 1)
    assert tuple(_rne_sat(np.int64(10), np.int64(2), np.int64(-2), np.int64(2))) == (2, 0)
    assert tuple(_rne_sat(np.int64(14), np.int64(2), np.int64(-2), np.int64(2))) == (2, 1)
    assert tuple(_rne_sat(np.int64(-14), np.int64(2), np.int64(-2), np.int64(2))) == (-2, 1)


def test_rounding_events_count_visible_ties_and_both_rails():
    fmt = IntFormat.full(3)  # [-4, 3]
    # /4: 0.5 (tie, even floor), 1.5 (tie, odd), 2.25, -2.5 (tie, odd floor -3 -> -2), 3.5 (tie -> 4:
    # clamped, so not a visible tie), -5 (clamped low), 9 (high), 0 with shift 0
    acc = np.array([2, 6, 9, -10, 14, -20, 36])
    assert rounding_events(acc, 2, fmt) == {"ties_even": 1, "ties_odd": 2, "sat_low": 1, "sat_high": 2}
    assert rounding_events(np.array([3, -3]), 0, fmt) == {"ties_even": 0, "ties_odd": 0, "sat_low": 0,
                                                          "sat_high": 0}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A trained-like tiny model's bundle with a 16-sample stress bundle and the accumulators."""
    _, im, x = build(0)
    out = tmp_path_factory.mktemp("golden") / "vec"
    manifest = export_bundle(im, x, out, stress=16, trace_acc=True)
    return im, x, out, manifest


def test_stress_vectors_show_ties_and_both_rails_at_every_site(bundle):
    im, _, out, manifest = bundle
    stress = json.loads((out / "stress" / "manifest.json").read_text())
    sites = {"layers.0.u", "avg", "logits"} | {f"layers.{i}.{t}" for i in range(2)
                                               for t in ("x_re", "x_im", "y", "za", "zb", "act", "out")}
    assert set(stress["events"]) == sites == set(manifest["events"])
    for site, ev in stress["events"].items():
        assert all(ev[e] > 0 for e in EVENTS), (site, ev)
    assert stress["warnings"] == [] and manifest["stress"]["warnings"] == []
    # the trained-like vectors: the warnings name exactly the sites that lack an event
    lacking = sorted(s for s, ev in manifest["events"].items() if min(ev.values()) == 0)
    assert sorted(w.split(":")[0] for w in manifest["warnings"]) == lacking
    # the stress bundle keeps the model's port widths and grids
    for name in ("layers.1.x_re", "layers.0.Abar_im", "layers.0.act", "logits", "decoder.decoder_W"):
        keep = {k: manifest["tensors"][name].get(k) for k in ("width", "qmin", "qmax")}
        assert {k: stress["tensors"][name].get(k) for k in keep} == keep, name


def test_stress_model_is_an_ordinary_integer_model():
    _, im, _ = build(1, residual=True)
    model, x, counts = stress_case(im, 6, seed=3)
    run = model.run(x)
    assert np.array_equal(run_fast(model, x).logits, run.logits)
    assert run.logits.tolist() == model_run(model, x.tolist())
    assert counts == stress_case(im, 6, seed=3)[2]  # deterministic


def test_accumulator_trace_rounds_to_the_traced_words(bundle):
    im, x, out, manifest = bundle
    run = im.run(x, trace=True)
    spec = manifest["tensors"]["layers.1.za.acc"]
    assert spec["kind"] == "trace" and not spec["output"] and spec["width"] == 64
    from qs4d_np.golden.vectors import read_tensor
    acc = read_tensor(out, "layers.1.za.acc", spec)
    lay = im.layers[1].mix_a.requant
    assert np.array_equal(np.clip(round_shift(acc, lay.R), lay.fmt.qmin, lay.fmt.qmax), run.layers[1]["za"])


def test_compare_names_a_fault_in_layer_0_step_0_first(bundle, tmp_path):
    im, x, out, _ = bundle
    faulty = copy.deepcopy(im)
    faulty.layers[0].core.m_b_re[1, 0] *= 3  # enters at step 0 (x_{-1} = 0) and spreads downstream
    export_bundle(faulty, x, tmp_path / "dump")
    report = compare_dumps(out, tmp_path / "dump", only="[!s]*")  # the model's own tensors, not stress/
    first = report.mismatches[0]
    assert (first.layer, first.tensor) == (0, "layers.0.x_re")
    assert first.index["sample"] == 0 and first.index["step"] == 0 and first.index["channel"] == 1
    assert {m.tensor for m in report.mismatches} >= {"layers.1.y", "avg", "logits"}
    assert "first mismatch: layer 0 layers.0.x_re [sample 0, step 0, channel 1" in report.summary()


def test_compare_only_checks_a_partial_dump(bundle, tmp_path):
    _, _, out, manifest = bundle
    dump = tmp_path / "dump"
    for name in ("layers.1.y", "stress/layers.0.x_re"):
        where = "stress/" if name.startswith("stress/") else ""
        spec = json.loads((out / where / "manifest.json").read_text())["tensors"][name.split("/")[-1]]
        (dump / where / spec["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / where / spec["file"], dump / where / spec["file"])
    assert compare_dumps(out, dump, only="layers.1.y").ok
    assert compare_dumps(out, dump, only="stress/layers.0.x_re").words == int(np.prod(
        json.loads((out / "stress/manifest.json").read_text())["tensors"]["layers.0.x_re"]["shape"]))
    with pytest.raises(FileNotFoundError, match=r"no such vector file: .*dump/expected/layers\.1\."):
        compare_dumps(out, dump, only="layers.1.*")
    with pytest.raises(ValueError, match="--only 'nothing' matches no output tensor"):
        compare_dumps(out, dump, only="nothing")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["tensors"]["logits"].update(width="sixteen"), "tensor 'logits' has width 'sixteen'; expected"),
    (lambda m: m.pop("tensors"), "has no 'tensors' table"),
    (lambda m: m["tensors"]["avg"].pop("shape"), "tensor 'avg' has no 'shape'"),
])
def test_cli_compare_reports_a_bad_manifest_in_one_line(bundle, tmp_path, capsys, edit, message):
    from qs4d_np.cli.main import main
    _, _, out, _ = bundle
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    edit(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert main(["golden", "compare", str(bad), "--rtl", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_scale_mode_flag_sets_range_modes_per_target(capsys):
    from qs4d_np.cli.common import CommandError, quant_config
    from qs4d_np.cli.main import build_parser

    def config(*flags):
        return quant_config(build_parser().parse_args(["train", "--out", "x", *flags]))

    q = config("--all_quant", "256", "--scale_mode", "state=running", "act=running")
    assert [q.target(t).scale_mode for t in ("state", "act", "A", "linear")] == ["running", "running", "absmax",
                                                                                 "absmax"]
    q = config("--all_quant", "16", "--scale_mode", "running", "C=learned")
    assert (q.target("D").scale_mode, q.target("C").scale_mode) == ("running", "learned")
    with pytest.raises(CommandError, match="no --\\*_quant flag"):
        config("--scale_mode", "running")
    for bad, message in (("state=ema", "scale mode must be one of"), ("bogus=running", "target must be one of")):
        with pytest.raises(SystemExit):
            config("--all_quant", "16", "--scale_mode", bad)
        assert message in capsys.readouterr().err


def qat_model(scale_mode, seed=3):
    from qs4d_np.models.s4d_model import S4DModel
    from qs4d_np.quant.config import QuantConfig
    from qs4d_np.train.ptq import calibrate
    quant = QuantConfig(256, state=4096, target_options={t: {"scale_mode": scale_mode} for t in ("act", "state")})
    model = S4DModel.from_preset("qs4d", 1, 10, d_model=2, d_state=2, n_layers=1, dropout=0.0, seed=seed,
                                 mode="recurrent", quant=quant)
    calibrate(model, [np.random.default_rng(seed).integers(0, 256, (4, 784, 1)) / 255.0], mode="recurrent")
    return model


def test_cli_exports_a_running_range_qat_model_with_steps_and_stress_and_refuses_absmax(tmp_path, capsys):
    from qs4d_np.cli.main import main
    qat_model("absmax").save(tmp_path / "absmax")
    export = ["golden", "export", "--dataset", "smnist", "--samples", "1", "--calib", "2"]
    assert main(export + ["--checkpoint", str(tmp_path / "absmax"), "--out", str(tmp_path / "v0")]) == 1
    err = capsys.readouterr().err
    assert "takes the range of state and act from each batch" in err and "--scale_mode state=running act=running" in err
    assert not (tmp_path / "v0").exists()
    qat_model("running").save(tmp_path / "running")
    vec = tmp_path / "vec"
    assert main(export + ["--checkpoint", str(tmp_path / "running"), "--out", str(vec), "--steps", "10",
                          "--stress", "4", "--trace-acc"]) == 0
    out, err = capsys.readouterr()
    assert "1 sample(s) x 10 steps" in out and "wrote 4 stress sample(s)" in out
    assert "warning: the trained model's vectors never show the tie rule or a clamp" in err
    manifest = json.loads((vec / "manifest.json").read_text())
    assert manifest["length"] == 10 and manifest["tensors"]["layers.0.y"]["shape"] == [1, 10, 2]
    assert json.loads((vec / "stress/manifest.json").read_text())["tensors"]["layers.0.y"]["shape"] == [4, 10, 2]
    assert main(["golden", "compare", str(vec), "--rtl", str(vec), "--only", "stress/*"]) == 0
    assert main(["golden", "export", "--checkpoint", str(tmp_path / "running"), "--out", str(tmp_path / "v1"),
                 "--dataset", "smnist", "--steps", "785"]) == 1
    assert "--steps 785 exceeds the task's sequence length 784" in capsys.readouterr().err


def test_bounded_multiplier_width_holds_its_bound_and_the_error_bound_or_names_the_smallest():
    from qs4d_np.golden.export import from_model
    from qs4d_np.golden.multiplier import MAX_EPS
    from qs4d_np.golden.twin import local_agreement
    from qs4d_np.quant.config import QuantConfig
    from test_golden_model import pixels, tiny_model
    model, x, quant = tiny_model(0), pixels(100), QuantConfig(256, state=4096)
    with pytest.raises(ValueError, match=r"max_mult_bits 12 is too narrow: .* the smallest multiplier width that "
                                         r"works for this model is (\d+)") as info:
        from_model(model, x / 255.0, quant=quant, max_mult_bits=12)
    smallest = int(info.value.args[0].rsplit(" ", 1)[-1])
    with pytest.raises(ValueError, match=f"is {smallest}$"):
        from_model(model, x / 255.0, quant=quant, max_mult_bits=smallest - 1)
    im = from_model(model, x / 255.0, quant=quant, max_mult_bits=smallest)
    mults = [v for k, v in im.arrays().items() if k.rsplit(".", 1)[-1].startswith("m_") or "_m" in k]
    assert max(int(v.max()).bit_length() for v in mults) <= smallest
    assert max(im.eps.values()) <= MAX_EPS
    report = local_agreement(im, x, im.run(x, trace=True))
    assert all(r["violations"] == 0 for r in report.values())


def test_shift_per_tensor_and_shared_state_step():
    from qs4d_np.golden.export import from_model
    from qs4d_np.quant.config import QuantConfig
    from test_golden_model import pixels, tiny_model
    model, x, quant = tiny_model(1, residual=True), pixels(101), QuantConfig(256, state=4096)
    one = from_model(model, x / 255.0, quant=quant, shift_per_tensor=True)
    for lay in one.layers:
        for R in (lay.core.r_x, lay.core.r_y, lay.mix_a.requant.R, lay.glu.R, lay.post.R):
            assert np.unique(R).size == 1
    shared = from_model(model, x / 255.0, quant=quant, shared_state_step=True)
    for i, lay in enumerate(shared.layers):
        c = lay.core
        assert np.array_equal(c.m_a_re, c.m_a_im_to_re) and np.array_equal(c.m_a_re, c.m_a_im_to_im)
        assert np.array_equal(shared.steps[f"layers.{i}.x_re"], shared.steps[f"layers.{i}.x_im"])
    # then the state sums are the 3-multiplier (Karatsuba) form with one Abar multiplier per mode; with
    # separate steps (the default export) they are not
    def karatsuba_matches(im) -> bool:
        c, run = im.layers[0].core, im.run(x, trace_acc=True).layers[0]
        xr = np.concatenate([np.zeros_like(run["x_re"][:, :1]), run["x_re"][:, :-1]], axis=1)
        xi = np.concatenate([np.zeros_like(run["x_im"][:, :1]), run["x_im"][:, :-1]], axis=1)
        t1, t2, t3 = c.Abar_re * xr, c.Abar_im * xi, (c.Abar_re + c.Abar_im) * (xr + xi)
        u = run["u"][..., None]
        return (np.array_equal(run["acc_x_re"], c.m_a_re * (t1 - t2) + c.m_b_re * c.Bbar_re * u)
                and np.array_equal(run["acc_x_im"], c.m_a_re * (t3 - t1 - t2) + c.m_b_im * c.Bbar_im * u))

    assert karatsuba_matches(shared)
    assert not karatsuba_matches(from_model(model, x / 255.0, quant=quant))
