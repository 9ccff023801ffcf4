"""Pruned SSM modes (C = 0) drop out of the integer export: compacted cores, the mode map in the
manifest, and the same integers on every output as the export that keeps every mode."""
import json

import numpy as np
import pytest

from qs4d_np.golden import read_memh
from qs4d_np.golden.bundle import export_bundle
from qs4d_np.golden.export import from_model
from qs4d_np.golden.fast import run_fast
from qs4d_np.golden.model import IntLayer, ModeMap
from qs4d_np.golden.twin import local_agreement, run_free
from qs4d_np.hardware.pruning import prune_magnitude
from qs4d_np.quant.config import QuantConfig

from reference.golden import model_run
from test_golden_model import pixels, tiny_model
from test_golden_vectors import snapshot

QUANT = dict(levels=256, state=2 ** 12)
STATE = ("x_re", "x_im", "sat_x_re", "sat_x_im")
# layer 0's modes set to C = 0 per channel: every channel drops one at least (channel 2 all), so N2' = 3
PRUNED = [[1, 3], [0], [0, 1, 2, 3], [2]]
KEPT = ((0, 2), (1, 2, 3), (), (0, 1, 3))


def export_pair(model, x):
    """(dropping export, export keeping every mode) of ``model`` calibrated on ``x``."""
    kw = dict(quant=QuantConfig(QUANT["levels"], state=QUANT["state"]))
    return from_model(model, x / 255.0, **kw), from_model(model, x / 255.0, drop_pruned=False, **kw)


def hand_pruned(seed=0, residual=False):
    model = tiny_model(seed, H=4, N=8, residual=residual)
    C = model.blocks[0].ssm.params["C"]
    for h, modes in enumerate(PRUNED):
        C[h, modes] = 0
    return model


def assert_same_outputs(im, full, x, kept_by_layer):
    """Every traced tensor equal; the states equal on the kept modes and 0 on the padding."""
    a, b = im.run(x, trace=True), full.run(x, trace=True)
    for name in ("logits", "predictions", "pooled", "avg"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for i, (ta, tb) in enumerate(zip(a.layers, b.layers)):
        assert set(ta) == set(tb)
        for name in set(ta) - set(STATE):
            assert np.array_equal(ta[name], tb[name]), (i, name)
        for name in STATE:
            N2 = im.layers[i].core.N2
            assert ta[name].shape == tb[name].shape[:3] + (N2,)
            for h, idx in enumerate(kept_by_layer[i]):
                assert np.array_equal(ta[name][:, :, h, :len(idx)], tb[name][:, :, h, list(idx)]), (i, name, h)
                assert not ta[name][:, :, h, len(idx):].any(), (i, name, h)
        for name in ("y", "za", "zb", "act", "out"):
            assert a.saturation[i][name] == b.saturation[i][name]
    fast = run_fast(im, x)
    assert np.array_equal(fast.logits, b.logits) and fast.saturation == a.saturation
    assert model_run(im, x.tolist()) == b.logits.tolist()  # the Python-int twin reads the compacted words


@pytest.mark.parametrize("residual", [False, True])
def test_hand_pruned_modes_are_dropped_and_outputs_unchanged(residual):
    model = hand_pruned(residual=residual)
    x = pixels(100)
    im, full = export_pair(model, x)
    core, core_full = im.layers[0].core, full.layers[0].core
    assert (core.H, core.N2, core_full.N2) == (4, 3, 4)
    assert im.layers[0].modes == ModeMap(4, KEPT)
    assert im.layers[1].modes is None and full.layers[0].modes is None
    for name, value in core.arrays().items():
        ref = getattr(core_full, name)
        if value.ndim == 1:  # D and the output multipliers are those of the full core
            assert np.array_equal(value, ref), name
            continue
        for h, idx in enumerate(KEPT):
            assert np.array_equal(value[h, :len(idx)], ref[h, list(idx)]), (name, h)
            assert not value[h, len(idx):].any(), (name, h)  # inert padding: every word 0
    for name in ("Abar_re", "Bbar_im"):
        assert im.steps[f"layers.0.{name}"].shape == (4, 3)
    # the untouched layer is the same core
    for name, value in im.layers[1].core.arrays().items():
        assert np.array_equal(value, getattr(full.layers[1].core, name)), name
    assert_same_outputs(im, full, x, [KEPT, [tuple(range(4))] * 4])
    # the fake-quant twin still agrees within the local bound, and end to end
    xs = pixels(7, batch=5)
    run = im.run(xs, trace=True)
    for key, r in local_agreement(im, xs, run).items():
        assert r["violations"] == 0, (key, r)
    assert np.array_equal(run.predictions, run_free(im, xs)["predictions"])


def test_manifest_records_the_mode_map(tmp_path):
    model = hand_pruned(1)
    x = pixels(101)
    im, full = export_pair(model, x)
    assert_same_outputs(im, full, x, [KEPT, [tuple(range(4))] * 4])
    export_bundle(im, x, tmp_path / "drop")
    export_bundle(full, x, tmp_path / "full")
    drop = json.loads((tmp_path / "drop" / "manifest.json").read_text())
    keep = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert drop["layers"][0]["N2"] == 3 and drop["layers"][0]["N2_original"] == 4
    assert drop["layers"][0]["modes_kept"] == [list(k) for k in KEPT]
    assert "modes_kept" not in drop["layers"][1] and drop["layers"][1]["N2"] == 4
    assert all("modes_kept" not in l for l in keep["layers"])
    assert drop["tensors"]["layers.0.C_re"]["shape"] == [4, 3]
    assert drop["tensors"]["layers.0.x_re"]["shape"] == [3, 12, 4, 3]
    # mapping back: the full export's words at the recorded original indices
    words = {}
    for tag in ("drop", "full"):
        for name in ("C_im", "Abar_re"):
            spec = json.loads((tmp_path / tag / "manifest.json").read_text())["tensors"][f"layers.0.{name}"]
            words[tag, name] = read_memh(tmp_path / tag / spec["file"], spec["width"], int(np.prod(spec["shape"])),
                                         signed=spec["signed"]).reshape(spec["shape"])
    for name in ("C_im", "Abar_re"):
        for h, idx in enumerate(drop["layers"][0]["modes_kept"]):
            assert np.array_equal(words["drop", name][h, :len(idx)], words["full", name][h, idx])
    # every expected output file but the state's is byte-identical
    for name, spec in keep["tensors"].items():
        if spec["kind"] == "output" and not any(name.endswith("." + s) for s in STATE):
            assert (tmp_path / "drop" / spec["file"]).read_bytes() == (tmp_path / "full" / spec["file"]).read_bytes()


def test_nothing_pruned_gives_identical_bundle_files(tmp_path):
    model = tiny_model(2, H=4, N=8)
    x = pixels(102)
    im, full = export_pair(model, x)
    assert all(l.modes is None for l in im.layers)
    export_bundle(im, x, tmp_path / "a" / "vec")
    export_bundle(full, x, tmp_path / "b" / "vec")
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert a and a == b


@pytest.mark.parametrize("granularity, sparsity", [("mode", 0.5), ("channel", 0.25)])
def test_modes_pruned_through_the_pruning_api(granularity, sparsity):
    model = tiny_model(3, H=4, N=8)
    masks = prune_magnitude(model, sparsity, granularity)
    masks.apply(model)
    x = pixels(103)
    im, full = export_pair(model, x)
    kept_by_layer = []
    for i, layer in enumerate(im.layers):
        keep_mask = masks.masks[f"layers.{i}.ssm.C"]
        assert layer.modes is not None and layer.modes.M == 4
        kept = layer.modes.kept
        for h, idx in enumerate(kept):
            # a masked mode is always dropped; a kept one only if its C rounds to code 0
            assert set(idx) <= set(np.flatnonzero(keep_mask[h]).tolist()), (i, h)
            codes = full.layers[i].core
            assert set(idx) == {n for n in range(4) if codes.C_re[h, n] or codes.C_im[h, n]}, (i, h)
        assert layer.core.N2 == max(1, max(len(k) for k in kept))
        if granularity == "channel":  # one of the 4 channels pruned whole: it keeps no mode
            assert [len(k) == 0 for k in kept].count(True) == 1
        kept_by_layer.append(kept)
    assert_same_outputs(im, full, x, kept_by_layer)


def test_mode_map_is_checked_against_the_core():
    model = hand_pruned()
    im, _ = export_pair(model, pixels(100))
    lay = im.layers[0]

    def rebuild(modes):
        return IntLayer(lay.core, lay.mix_a, lay.mix_b, lay.sig_lut, lay.sig_bits, lay.glu, lay.post,
                        lay.residual, modes)

    rebuild(ModeMap(4, KEPT))
    with pytest.raises(ValueError, match="mode map has 3 channels, the core 4"):
        rebuild(ModeMap(4, KEPT[:3]))
    with pytest.raises(ValueError, match="N2=3 modes, more than the original M=2"):
        rebuild(ModeMap(2, KEPT))
    with pytest.raises(ValueError, match=r"channel 1: kept modes \[2, 1\] must be increasing"):
        rebuild(ModeMap(4, (KEPT[0], (2, 1), KEPT[2], KEPT[3])))
    with pytest.raises(ValueError, match=r"channel 0: padding modes 1..2 must be all zero words"):
        rebuild(ModeMap(4, ((0,),) + KEPT[1:]))
    with pytest.raises(TypeError, match="drop_pruned must be True or False"):
        from_model(model, pixels(100) / 255.0, quant=QuantConfig(256, state=2 ** 12), drop_pruned=1)
