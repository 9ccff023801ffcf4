"""The whole integer model: export from an S4DModel, integer-only run, the local agreement bound
against the float64 fake-quant twin, vector bundles and the RTL-dump comparison."""
import ast
import inspect
import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qs4d_np.golden import compare_dumps, model as golden_model, read_memh, write_memh
from qs4d_np.golden.bundle import export_bundle
from qs4d_np.golden.export import from_model
from qs4d_np.golden.fast import _mixing_words, run_fast
from qs4d_np.golden.twin import codes, local_agreement, run_free
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.quant.config import QuantConfig

from reference.golden import model_run
from test_golden import FLOAT_NAMES
from test_golden_vectors import crash_after, snapshot


def tiny_model(seed=0, *, residual=False, norm="batch", H=4, N=4, layers=2, classes=3):
    model = S4DModel.from_preset("qs4d", 1, classes, d_model=H, d_state=N, n_layers=layers, dropout=0.0,
                                 residual=residual, norm=norm, seed=seed)
    rng = np.random.default_rng(seed)
    for block in model.blocks:  # trained-looking BatchNorm statistics, one negative gain
        if norm == "batch":
            block.norm.buffers["running_mean"][...] = rng.normal(0, 0.2, H)
            block.norm.buffers["running_var"][...] = rng.uniform(0.3, 3.0, H)
            block.norm._params["weight"][0] = -0.7
    return model


def pixels(seed, batch=3, length=12):
    return np.random.default_rng(seed).integers(0, 256, (batch, length, 1))


def build(seed=0, levels=256, state=2 ** 12, widths=None, **kw):
    model = tiny_model(seed, **kw)
    x = pixels(seed + 100)
    im = from_model(model, x / 255.0, quant=QuantConfig(levels, state=state), widths=widths)
    return model, im, x


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2 ** 16), st.sampled_from([16, 256, 4096]), st.sampled_from([64, 2 ** 12, 2 ** 16]),
       st.booleans(), st.sampled_from(["batch", None]))
def test_every_traced_tensor_within_the_local_bound(seed, levels, state, residual, norm):
    _, im, x = build(seed, levels, state, residual=residual, norm=norm)
    run = im.run(x, trace=True)
    report = local_agreement(im, x, run)
    assert {f"layers.{i}.{t}" for i in range(2) for t in ("x_re", "x_im", "y", "za", "zb", "act")} | {"avg", "logits"} <= set(report)
    for key, r in report.items():
        assert r["violations"] == 0, (key, r)
        assert r["max_diff"] <= 1
        assert r["eps"] < 2.0 ** -4  # far below one LSB: a difference is a rare event at a boundary


def test_local_bound_check_catches_a_wrong_word():
    _, im, x = build(1)
    run = im.run(x, trace=True)
    run.layers[1]["za"][0, 5, 2] += 2
    report = local_agreement(im, x, run)
    assert report["layers.1.za"]["violations"] == 1 and report["layers.1.za"]["max_diff"] == 2
    assert report["layers.1.y"]["violations"] == 0


def test_integer_model_agrees_with_free_running_twin_end_to_end():
    _, im, x = build(2)
    x = pixels(7, batch=8, length=12)
    run, twin = im.run(x), run_free(im, x)
    assert np.array_equal(run.predictions, twin["predictions"])
    assert np.abs(run.logits - twin["logits"]).max() <= 0.01 * np.abs(twin["logits"]).max()


def test_every_array_is_int64_and_float_input_is_refused():
    _, im, x = build(3)
    run = im.run(x, trace=True)
    for layer in run.layers:
        for name, value in layer.items():
            assert value.dtype == np.int64, name
    for name, value in im.arrays().items():
        assert value.dtype == np.int64, name
    assert run.logits.dtype == run.pooled.dtype == np.int64
    with pytest.raises(TypeError, match="x must be an integer numpy array, got float64"):
        im.run(x.astype(np.float64))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 12, 1\), got \(3, 11, 1\)"):
        im.run(x[:, :11])


def test_model_module_has_no_float_operation():
    tree = ast.parse(inspect.getsource(golden_model))
    for node in ast.walk(tree):
        assert not (isinstance(node, ast.Constant) and isinstance(node.value, float)), ast.dump(node)
        assert not isinstance(node, ast.Div), "model.py uses true division"
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        assert name not in FLOAT_NAMES, f"line {node.lineno}: {name}"


def test_residual_and_negative_gain_are_exercised():
    _, im, _ = build(4, residual=True)
    post = im.layers[0].post
    assert len(post.M) == 2 and post.sign[0] == -1 and post.offset is not None


def test_unsupported_models_and_float_targets_are_refused():
    x = pixels(0) / 255.0
    with pytest.raises(ValueError, match=r"norm='layer' \(LayerNorm needs"):
        from_model(tiny_model(norm="layer"), x, quant=QuantConfig(256, state=4096))
    gelu = S4DModel(1, 3, d_model=4, d_state=4, n_layers=1, norm="batch", activation="gelu", dropout=0.0, seed=0)
    with pytest.raises(ValueError, match=r"activation='gelu'"):
        from_model(gelu, x, quant=QuantConfig(256))
    with pytest.raises(ValueError, match=r"float \(unquantized\) targets cannot be made integer: state, act;"):
        from_model(tiny_model(), x, quant=QuantConfig(A=256, B=256, C=256, D=256, linear=256, coder=256))
    with pytest.raises(ValueError, match=r"float \(unquantized\) targets cannot be made integer: state \(layers \[1\]\)"):
        from_model(tiny_model(), x, quant=QuantConfig(256, state={0: 4096, 1: "float"}))
    with pytest.raises(ValueError, match=r"grid \[-128, 128\] needs 9 bits, but width 8"):
        from_model(tiny_model(), x, quant=QuantConfig(256, grid="qs4d"), widths={"linear": 8})
    with pytest.raises(ValueError, match=r"no quantization config \(a float model\)"):
        from_model(tiny_model(), x)
    with pytest.raises(TypeError, match="quant must be a QuantConfig, got dict"):
        from_model(tiny_model(), x, quant={"all": 256})


def test_bundle_round_trip_and_compare_finds_exactly_the_corrupted_word(tmp_path):
    _, im, x = build(5)
    manifest = export_bundle(im, x, tmp_path / "vec", labels=np.array([0, 1, 2]))
    stored = json.loads((tmp_path / "vec" / "manifest.json").read_text())
    assert stored["spec_version"] == 2 and stored["samples"] == 3 and stored["labels"] == [0, 1, 2]
    y = stored["tensors"]["layers.1.y"]
    assert y["shape"] == [3, 12, 4] and y["file"] == "expected/layers.1.y.memh" and y["output"]
    assert stored["tensors"]["layers.0.m_a_re"]["width"] == 64
    assert stored["tensors"]["layers.0.Abar_re"]["scale"] is not None
    # weights read back equal the model's integers
    for name in ("layers.0.Abar_im", "layers.1.mix_b_W", "decoder.decoder_b", "layers.0.sig_lut"):
        spec = stored["tensors"][name]
        back = read_memh(tmp_path / "vec" / spec["file"], spec["width"], int(np.prod(spec["shape"])),
                         signed=spec["signed"])
        assert np.array_equal(back, im.arrays()[name].ravel()), name
    dump = tmp_path / "rtl"
    shutil.copytree(tmp_path / "vec", dump)
    assert compare_dumps(tmp_path / "vec", dump).ok
    run = im.run(x, trace=True)
    got = run.layers[1]["x_im"].copy()
    got[2, 7, 3, 1] += 1 if got[2, 7, 3, 1] < im.layers[1].core.formats.x.qmax else -1
    write_memh(dump / "expected/layers.1.x_im.memh", got, manifest["tensors"]["layers.1.x_im"]["width"])
    report = compare_dumps(tmp_path / "vec", dump)
    assert len(report.mismatches) == 1
    m = report.mismatches[0]
    assert (m.layer, m.tensor, m.index) == (1, "layers.1.x_im", {"sample": 2, "step": 7, "channel": 3, "mode": 1})
    assert abs(m.diff_lsb) == 1
    assert "first mismatch: layer 1 layers.1.x_im [sample 2, step 7, channel 3, mode 1]" in report.summary()


def test_compare_names_file_and_line_of_a_bad_dump(tmp_path):
    _, im, x = build(6)
    export_bundle(im, x, tmp_path / "vec")
    dump = tmp_path / "rtl"
    shutil.copytree(tmp_path / "vec", dump)
    path = dump / "expected/logits.memh"
    good = path.read_text().splitlines()
    lines = good.copy()
    lines[4] = "zz" + lines[4][2:]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"expected/logits.memh:5: expected a 4-digit hex word, got 'zz"):
        compare_dumps(tmp_path / "vec", dump)
    path.write_text("\n".join(good[:7]) + "\n")
    with pytest.raises(ValueError, match=r"logits.memh: expected 9 words, found 7 "):
        compare_dumps(tmp_path / "vec", dump)


def test_codes_round_half_to_even_then_clamp():
    from qs4d_np.golden.fixedpoint import IntFormat
    assert codes(np.array([0.5, 1.5, -2.5, 9.0, -9.7]), IntFormat.full(4)).tolist() == [0, 2, -2, 7, -8]


def test_cli_export_and_compare(tmp_path, capsys):
    from qs4d_np.cli.main import main
    model = tiny_model(8, H=2, N=2, layers=1, classes=10)
    model.save(tmp_path / "m")
    vec, dump = tmp_path / "vec", tmp_path / "dump"
    assert main(["golden", "export", "--checkpoint", str(tmp_path / "m"), "--out", str(vec), "--samples", "1",
                 "--calib", "2", "--dataset", "smnist", "--all_quant", "256", "--state_quant", "4096"]) == 0
    assert "spec version 2" in capsys.readouterr().out
    shutil.copytree(vec, dump)
    assert main(["golden", "compare", str(vec), "--rtl", str(dump)]) == 0
    assert "the RTL agrees bit for bit" in capsys.readouterr().out
    spec = json.loads((vec / "manifest.json").read_text())["tensors"]["layers.0.act"]
    words = (dump / spec["file"]).read_text().splitlines()
    words[100] = "00" if words[100] != "00" else "01"
    (dump / spec["file"]).write_text("\n".join(words) + "\n")
    assert main(["golden", "compare", str(vec), "--rtl", str(dump)]) == 1
    out = capsys.readouterr().out
    assert "first mismatch: layer 0 layers.0.act [sample 0, step 50, channel 0]" in out and "1 word(s) differ" in out
    assert main(["golden", "compare", str(vec), "--rtl", str(tmp_path / "nothing")]) == 1
    assert "no such vector file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["golden", "export", "--checkpoint", "x", "--out", "y", "--samples", "0"])
    assert exc.value.code == 2
    # a float model without --*_quant flags cannot be made integer
    assert main(["golden", "export", "--checkpoint", str(tmp_path / "m"), "--out", str(vec), "--dataset",
                 "smnist", "--calib", "2"]) == 1
    assert "no quantization config (a float model)" in capsys.readouterr().err


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2 ** 16), st.sampled_from([16, 256, 4096]), st.sampled_from([64, 2 ** 12, 2 ** 16]),
       st.booleans(), st.sampled_from(["batch", None]), st.integers(1, 3), st.booleans())
def test_numpy_and_numba_paths_equal_the_python_int_twin(seed, levels, state, residual, norm, batch, wide):
    # wide y: the mixing's accumulator bound exceeds int32, so the kernel's int64 mixing runs
    if wide:
        levels = 4096
    _, im, x = build(seed, levels, state, residual=residual, norm=norm, widths={"y": 22} if wide else None)
    assert _mixing_words(im.layers[0])[0].dtype == (np.int64 if wide else np.int32)
    x = pixels(seed + 1, batch=batch)
    # words at the input grid's edges too
    x[0, :3, 0] = [0, 255, 255]
    want = model_run(im, x.tolist())
    slow, fast = im.run(x), run_fast(im, x)
    assert slow.logits.tolist() == want
    assert fast.logits.tolist() == want
    assert np.array_equal(fast.avg, slow.avg) and fast.saturation == slow.saturation


def test_fast_path_checks_its_input():
    _, im, x = build(0)
    with pytest.raises(TypeError, match="x must be an integer numpy array"):
        run_fast(im, x.astype(np.float32))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 12, 1\)"):
        run_fast(im, x[:, :5])


def test_qat_model_exports_through_its_own_quantizers():
    from qs4d_np.train.ptq import calibrate
    quant = QuantConfig(256, state=4096, target_options={"act": {"scale_mode": "running"},
                                                         "state": {"scale_mode": "running"}})
    model = S4DModel.from_preset("qs4d", 1, 3, d_model=4, d_state=4, n_layers=2, dropout=0.0, seed=3,
                                 mode="recurrent", quant=quant)
    x = pixels(9, batch=6)
    calibrate(model, [x / 255.0], mode="recurrent")
    im = from_model(model, x / 255.0)
    ssm = model.blocks[1].ssm
    want = ssm.q["C"].quantize(ssm.params["C"])
    assert np.array_equal(im.layers[1].core.C_re, want.q[0]) and np.array_equal(im.layers[1].core.C_im, want.q[1])
    assert np.allclose(im.steps["layers.1.act"], 1.0 / ssm.q["act"].quantize(np.zeros((1, 1, 4), np.float32)).inv_scale)
    logits = model.forward((x / 255.0).astype(np.float32), mode="recurrent")
    run = im.run(x)
    # the integer logits in real units follow the QAT model's up to its few extra roundings
    real = run.logits * im.steps["logits"]
    assert np.abs(real - logits).max() <= 0.05 * np.abs(logits).max() + 1e-3


@pytest.mark.parametrize("abar", ["continuous", "discrete"])
def test_export_codes_and_steps_equal_the_public_quantized_recurrent(abar):
    # export.py reads the layer through its quantizers (it also supports absmax state / act
    # ranges calibrated on x_calib, which quantized_recurrent() resolves only given calib); with
    # static ranges both must give the same integers and steps, bit for bit
    from qs4d_np.train.ptq import calibrate
    quant = QuantConfig(256, state=4096, target_options={"act": {"scale_mode": "running"},
                                                         "state": {"scale_mode": "running"}})
    model = S4DModel.from_preset("qs4d", 1, 3, d_model=4, d_state=4, n_layers=2, dropout=0.0, seed=3,
                                 mode="recurrent", quant=quant, abar=abar)
    x = pixels(9, batch=6)
    calibrate(model, [x / 255.0], mode="recurrent")
    im = from_model(model, x / 255.0)
    for i, block in enumerate(model.blocks):
        want, core, p = block.ssm.quantized_recurrent(), im.layers[i].core, f"layers.{i}."
        for key in ("Abar", "Bbar", "C"):
            steps = np.broadcast_to(1.0 / np.asarray(want[key].inv_scale, dtype=np.float64), want[key].q.shape)
            for j, part in enumerate(("re", "im")):
                assert np.array_equal(getattr(core, f"{key}_{part}"), want[key].q[j]), (i, key, part)
                if key != "C":
                    assert np.array_equal(im.steps[p + f"{key}_{part}"], steps[j]), (i, key, part)
        assert np.array_equal(core.D, want["D"].q)
        inv = want["state"].per_channel_inv(4, np.dtype(np.float64))
        assert np.array_equal(im.steps[p + "x_re"], 1.0 / inv[:, 0]) and np.array_equal(im.steps[p + "x_im"], 1.0 / inv[:, 1])
        # both take the act step the float32 forward quantizes with
        act_inv = want["act"]["inv_scale"]
        assert act_inv.dtype == np.float32
        assert np.array_equal(im.steps[p + "act"], np.broadcast_to(1.0 / act_inv.astype(np.float64), (4,)))


def test_interrupted_bundle_reexport_keeps_the_previous_bundle(tmp_path, monkeypatch):
    from qs4d_np.golden import bundle
    _, im, x = build(5)
    export_bundle(im, x[:1], tmp_path / "vec")
    before = snapshot(tmp_path)
    written = crash_after(monkeypatch, bundle, 10)
    with pytest.raises(OSError, match="simulated crash"):
        export_bundle(im, x, tmp_path / "vec")
    assert len(written) == 10 and snapshot(tmp_path) == before  # no staged copy left either
    monkeypatch.undo()
    manifest = export_bundle(im, x, tmp_path / "vec")
    assert manifest["samples"] == x.shape[0] == json.loads((tmp_path / "vec/manifest.json").read_text())["samples"]
    assert compare_dumps(tmp_path / "vec", tmp_path / "vec").ok


def test_float_model_export_keeps_abar_codes_in_the_unit_disk():
    # a float model exported with A at 16 states: the export's own quantizer applies QuantConfig's
    # abar_bound like a QAT layer's Abar quantizer (4-bit Cartesian rounding leaves the disk otherwise)
    model = tiny_model(1, H=8, N=64)
    x = pixels(3)

    def moduli(**options):
        im = from_model(model, x / 255.0, quant=QuantConfig(256, A=16, state=4096, **options))
        core, s = im.layers[0].core, im.steps
        return np.hypot(core.Abar_re * s["layers.0.Abar_re"], core.Abar_im * s["layers.0.Abar_im"])

    assert moduli().max() <= 1.0
    assert moduli(abar_bound=False).max() > 1.0
