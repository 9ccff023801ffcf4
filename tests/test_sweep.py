"""qs4d sweep / search without a cluster: specs, their checks, trial names, the manifest, the greedy search.

Nothing here starts Dask: a bad spec must be refused before an engine exists (and these tests run
where dask is not installed). The runs on a cluster are in ``test_sweep_cluster.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qs4d_np.cli.main import main
from qs4d_np.models.s4d_model import S4DModel
from qs4d_np.sweep.errors import SweepError
from qs4d_np.sweep.manifest import Manifest, identity_differences
from qs4d_np.sweep.naming import trial_name
from qs4d_np.sweep.search import Budget, greedy_search
from qs4d_np.sweep.spec import parse_spec

COMMANDS = ("train", "ptq", "eval")


# -- the spec's trials ------------------------------------------------------------------------------
def test_trials_are_the_product_of_the_axes_in_order():
    spec = parse_spec({"command": "train", "base": {"epochs": 1},
                       "axes": {"all_quant": [16, 64], "seed": [0, 1, 2]}}, COMMANDS)
    trials = spec.trials()
    assert [(t["all_quant"], t["seed"]) for t in trials] == [(16, 0), (16, 1), (16, 2), (64, 0), (64, 1), (64, 2)]
    assert all(t["epochs"] == 1 for t in trials)
    assert spec.axis_values(trials[4]) == {"all_quant": 64, "seed": 1}


def test_zipped_axes_vary_together():
    spec = parse_spec({"command": "train", "axes": {"lr": [0.1, 0.01], "seed": [0, 1], "epochs": [1, 2]},
                       "zip": ["lr", "epochs"]}, COMMANDS)
    assert [(t["lr"], t["epochs"], t["seed"]) for t in spec.trials()] == [
        (0.1, 1, 0), (0.1, 1, 1), (0.01, 2, 0), (0.01, 2, 1)]
    assert len(parse_spec({"command": "train", "base": {}}, COMMANDS).trials()) == 1  # no axes: one trial
    one_flag_each = parse_spec({"command": "train", "axes": {"A_quant": [16, None], "C_quant": [None, 16]},
                                "zip": ["A_quant", "C_quant"]}, COMMANDS)  # zipped values may repeat
    assert [(t["A_quant"], t["C_quant"]) for t in one_flag_each.trials()] == [(16, None), (None, 16)]


@pytest.mark.parametrize("spec, message", [
    ({"command": "train", "axes": {"seed": []}}, "axis 'seed' is empty"),
    ({"command": "train", "axes": {"seed": 3}}, "axis 'seed' must be a list"),
    ({"command": "train", "axes": {"seed": [1, 1]}}, "axis 'seed' repeats the value(s) [1]"),
    ({"command": "train", "axes": {"a": [1, 1], "b": [2, 2]}, "zip": ["a", "b"]},
     "axis 'a' + 'b' repeats the value(s) [{'a': 1, 'b': 2}]"),
    ({"command": "train", "bases": {}}, "unknown key(s) 'bases'"),
    ({"command": "golden"}, "'command' must be one of train, ptq, eval"),
    ({"command": "train", "base": {"seed": 0}, "axes": {"seed": [1]}}, "'seed' in both"),
    ({"command": "train", "axes": {"a": [1], "b": [1, 2]}, "zip": ["a", "b"]}, "one length"),
    ({"command": "train", "axes": {"a": [1]}, "zip": ["a", "c"]}, "'zip' names 'c'"),
])
def test_bad_spec_structure_is_refused(spec, message):
    with pytest.raises(SweepError) as err:
        parse_spec(spec, COMMANDS)
    assert message in str(err.value)


@pytest.mark.parametrize("spec, message", [
    # an unknown key
    ({"command": "train", "base": {"epochz": 1}}, "unknown key 'epochz': `qs4d train` has no flag --epochz"),
    # a flag this subcommand does not accept (ptq has no --epochs)
    ({"command": "ptq", "base": {"checkpoint": "x", "epochs": 1}}, "unknown key 'epochs': `qs4d ptq`"),
    ({"command": "ptq", "base": {"checkpoint": "no/such/run"}}, "key 'checkpoint': no model at"),
    ({"command": "train", "base": {"data_dir": "no/such/folder"}}, "no/such/folder: no such folder"),
    # values the subcommand's own parser refuses
    ({"command": "train", "base": {"epochs": 0}}, "key 'epochs': argument --epochs: expected an integer >= 1, got 0"),
    ({"command": "train", "axes": {"all_quant": [16, 1]}}, "key 'all_quant': argument --all_quant: expected an "
                                                           "integer >= 2, got 1"),
    ({"command": "train", "base": {"dataset": "imagenet"}}, "key 'dataset': argument --dataset: invalid choice"),
    ({"command": "train", "base": {"quiet": "yes"}}, "key 'quiet' is a flag without a value: give true or false"),
    ({"command": "train", "base": {"epochs": [1, 2]}}, "key 'epochs' takes one string or number"),
    ({"command": "train", "base": {"out": "elsewhere"}}, "key 'out' is set by the sweep itself"),
    ({"command": "eval", "base": {}}, "the following arguments are required: --checkpoint"),
    ({"command": "ptq", "base": {"checkpoint": "RUN", "bits": [2, 4]}}, "key 'bits': a ptq trial is one"),
    ({"command": "ptq", "base": {"checkpoint": "RUN", "bits": 1}}, "the quantization is not valid"),
])
def test_bad_spec_is_refused_before_anything_runs(tmp_path, capsys, spec, message):
    model = S4DModel(1, 10, d_model=4, d_state=4, n_layers=1, seed=0)
    model.save(tmp_path / "model")  # "RUN": a checkpoint that exists
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec).replace('"RUN"', json.dumps(str(tmp_path / "model"))))
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qs4d sweep: error: spec ") and message in err, err
    assert not out.exists()  # nothing was written


def test_unreadable_spec_is_refused(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text("{not json")
    assert main(["sweep", str(path), "--out", str(tmp_path / "o")]) == 1
    assert "is not valid JSON" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 1
    assert "no such file" in capsys.readouterr().err


# -- names and the manifest -------------------------------------------------------------------------
def test_trial_names_are_stable_hashes_of_the_settings():
    name = trial_name("train", {"seed": 0, "all_quant": 16})
    assert name == trial_name("train", {"all_quant": 16, "seed": 0})  # key order does not matter
    assert name.startswith("train-") and len(name) == len("train-") + 12
    assert len({name, trial_name("train", {"seed": 1, "all_quant": 16}), trial_name("ptq", {"seed": 0, "all_quant": 16}),
                trial_name("train", {"seed": 0, "all_quant": 16, "epochs": 1})}) == 4
    # pinned: a rerun in another Python process or release must find the same directory
    assert trial_name("train", {"seed": 0}) == "train-" + __import__("hashlib").sha256(
        b'{"command":"train","settings":{"seed":0}}').hexdigest()[:12]


def test_manifest_refuses_another_identity_and_names_the_differences(tmp_path):
    identity = {"command": "train", "base": {"epochs": 2}, "axes": {"seed": [0, 1]}}
    manifest = Manifest.open(tmp_path / "s", "sweep", identity)
    manifest.add("t1", {"seed": 0})
    manifest.record("t1", "done", result={"test_acc": 0.5})
    again = Manifest.open(tmp_path / "s", "sweep", identity)
    assert again.done("t1") and again.result("t1") == {"test_acc": 0.5}
    before = (tmp_path / "s" / "sweep.json").read_bytes()
    with pytest.raises(SweepError) as err:
        Manifest.open(tmp_path / "s", "sweep", {**identity, "base": {"epochs": 3}, "axes": {"seed": [0, 1, 2]}})
    assert "base.epochs: 2 recorded, 3 now" in str(err.value) and "axes.seed: [0, 1] recorded" in str(err.value)
    with pytest.raises(SweepError, match="holds a sweep, not a search"):
        Manifest.open(tmp_path / "s", "search", identity)
    assert (tmp_path / "s" / "sweep.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["sweep.json"]  # no temporary files left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(SweepError, match="not a sweep directory"):
        Manifest.open(tmp_path / "other", "sweep", identity)


def test_identity_differences():
    assert identity_differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 2}}) == []
    assert identity_differences({"a": {"b": 1}}, {"a": {"b": 2, "d": 0}}) == [
        "a.b: 1 recorded, 2 now", "a.d: absent in the recorded one, 0 now"]


# -- the greedy search ------------------------------------------------------------------------------
WEIGHTS = {"A": 5.0, "C": 3.0, "D": 0.0}  # cost per bit; D costs nothing (like D in the QS4D formulas)


def _cost(w):
    return sum(WEIGHTS[t] * b for t, b in w.items())


def _accuracy(w):  # A hurts most per bit saved, C a little, D not at all
    return 1.0 - 0.05 * (8 - w["A"]) ** 2 - 0.001 * (8 - w["C"]) - 0.2 * (8 - w["D"])


def test_greedy_search_takes_the_best_accuracy_per_cost_saved_until_the_budget_is_met():
    evaluated = []

    def evaluate(candidates):
        evaluated.append([dict(c) for c in candidates])
        return [{"val_acc": _accuracy(c), "test_acc": None, "run_dir": ""} for c in candidates]

    limit = _cost({"A": 8, "C": 8, "D": 8}) - 3 * 6 - 5 + 0.5  # C down to 2 bits and one bit of A
    path = greedy_search(["A", "C", "D"], _cost, evaluate, limit, start=8, minimum=2, log=lambda s: None)
    assert path[-1].cost <= limit < path[-2].cost
    for before, after in zip(path, path[1:]):
        moves = [(t, {**before.widths, t: before.widths[t] - 1}) for t in ("A", "C")  # D saves nothing
                 if before.widths[t] > 2]
        ratio = {t: (_accuracy(w) - _accuracy(before.widths)) / (_cost(before.widths) - _cost(w)) for t, w in moves}
        assert after.move["target"] == max(ratio, key=ratio.get)
        assert len(after.candidates) == len(moves)
    assert [s.move["target"] for s in path[1:]] == ["C"] * 6 + ["A"]  # C is cheap in accuracy: it goes first
    assert all(w["D"] == 8 for w in (s.widths for s in path))
    assert evaluated[0] == [{"A": 8, "C": 8, "D": 8}]


def test_greedy_search_refuses_an_unreachable_budget():
    with pytest.raises(SweepError, match="cannot be met"):
        greedy_search(["A", "C"], _cost, lambda c: [], 10.0, start=8, minimum=2, log=lambda s: None)


@pytest.mark.parametrize("text, expected", [("ace=1e6", Budget("ace", 1e6)), ("size=8x", Budget("size", 8, True)),
                                            ("adc=300", Budget("adc", 300))])
def test_budget_parse(text, expected):
    assert Budget.parse(text) == expected
    assert Budget.parse("ace=8x").limit(800.0) == 100.0 and Budget.parse("ace=50").limit(800.0) == 50


@pytest.mark.parametrize("text", ["ace", "flops=3", "ace=-1", "ace=0.5x", "ace=abc", "size=nan"])
def test_bad_budget_is_refused(text):
    with pytest.raises(SweepError, match="--budget"):
        Budget.parse(text)


def test_settings_become_the_subcommands_argv():
    from qs4d_np.cli.trial import command_parser
    from qs4d_np.sweep.argv import settings_argv

    parser = command_parser("ptq")
    argv = settings_argv(parser, {"checkpoint": "run", "bits": [2, 4], "targets": "A", "limit_test": 5,
                                  "grid": None, "calib_batches": 3}, where="here")
    assert argv == ["--checkpoint", "run", "--bits", "2", "4", "--targets", "A", "--limit-test", "5",
                    "--calib-batches", "3"]  # null (grid) leaves the flag out
    train = command_parser("train")
    assert settings_argv(train, {"quiet": True, "epochs": 2}, where="here") == ["--quiet", "--epochs", "2"]
    assert settings_argv(train, {"quiet": False}, where="here") == []
    with pytest.raises(SweepError, match="key 'resume' is set by the sweep"):
        settings_argv(train, {"resume": True}, where="here", reserved=("resume",))
