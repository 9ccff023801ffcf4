"""The shared plumbing: Module dicts, argument checks, atomic pickle-free IO, gradcheck."""
import json
import os

import numpy as np
import pytest

from qs4d_np.core.checks import check_array, check_choice, check_int, check_sequence_input
from qs4d_np.core.module import Module
from qs4d_np.io import atomic_save_npz, atomic_write_json, load_json, load_npz
from reference.gradcheck import grad_error, numerical_grad


class Scale(Module):
    def __init__(self):
        super().__init__()
        self._params["w"] = np.array([2.0])

    def forward(self, x, training=False):
        self._cache = x
        return x * self._params["w"]

    def backward(self, grad):
        x = self._saved()
        self._grads["w"] = np.array([np.sum(grad * x)])
        return grad * self._params["w"]


class Pair(Module):
    def __init__(self):
        super().__init__()
        self.a = self.add_child("a", Scale())
        self.b = self.add_child("b", Scale())


def test_dotted_params_share_arrays():
    m = Pair()
    assert sorted(m.params) == ["a.w", "b.w"]
    m.params["a.w"][0] = 5.0
    assert m.a._params["w"][0] == 5.0
    assert [name for name, _ in m.modules()] == ["", "a", "b"]


def test_inline_children_keep_the_parents_names():
    # an op split into parts (the S4D layer and its core) keeps its checkpoint keys
    outer = Module()
    inner = outer.add_child("core", Pair(), inline=True)
    outer.add_child("c", Scale())
    assert list(outer.params) == ["a.w", "b.w", "c.w"] and outer.params["a.w"] is inner.a.params["w"]
    assert [name for name, _ in outer.modules()] == ["", "", "a", "b", "c"]
    outer.zero_grads()
    assert list(outer.grads) == ["a.w", "b.w", "c.w"]
    assert outer.children()["core"] is inner  # still a child by its name
    clash = Module()
    clash.add_child("one", Scale(), inline=True)
    clash.add_child("two", Scale(), inline=True)  # both would be "w": refused, not shadowed
    with pytest.raises(ValueError, match="two entries named 'w'"):
        clash.params
    clash.add_child("two", Scale())  # re-added as an ordinary child: its names get the prefix again
    assert list(clash.params) == ["w", "two.w"]


def test_zero_grads_set_grad_and_kept_caches_reach_every_descendant():
    m = Pair()
    m.zero_grads()
    assert {k: v.tolist() for k, v in m.grads.items()} == {"a.w": [0.0], "b.w": [0.0]}
    m.a.set_grad("w", np.array([3.0]))  # a gradient computed outside the op's backward
    assert m.grads["a.w"].tolist() == [3.0]
    with pytest.raises(ValueError, match=r"name must be one of \['w'\], got 'v'"):
        m.a.set_grad("v", np.array([3.0]))
    with pytest.raises(ValueError, match=r"grad must have shape \(1,\), got \(2,\)"):
        m.a.set_grad("w", np.zeros(2))
    m.a.forward(np.array([1.0]))
    with m.kept_caches():
        m.a.forward(np.array([7.0]))
        m.b.forward(np.array([8.0]))
    assert m.a.backward(np.ones(1)).tolist() == [2.0] and m.grads["a.w"].tolist() == [1.0]  # the first x
    with pytest.raises(RuntimeError, match="before forward"):  # b had no cache before the block
        m.b.backward(np.ones(1))


def test_backward_before_forward_is_clear():
    with pytest.raises(RuntimeError, match="before forward"):
        Scale().backward(np.ones(1))


def test_checks_name_the_argument():
    with pytest.raises(ValueError, match="u must have shape \\(batch, length, 4\\)"):
        check_sequence_input("u", np.zeros((2, 3, 5)), 4)
    with pytest.raises(ValueError, match="non-finite"):
        check_array("x", np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match=r"D must have shape \(2,\), got \(3,\)"):  # a 1-tuple keeps its comma
        check_array("D", np.zeros(3), shape=(2,))
    with pytest.raises(ValueError, match="init must be one of"):
        check_choice("init", "foo", ["lin", "inv"])
    with pytest.raises(TypeError, match="d_state must be an integer"):
        check_int("d_state", 3.0)


def test_atomic_io_roundtrip(tmp_path):
    arrays = {"a": np.arange(3.0), "c": np.array([1 + 2j])}
    atomic_save_npz(tmp_path / "x.npz", arrays)
    back = load_npz(tmp_path / "x.npz")
    assert set(back) == {"a", "c"} and np.array_equal(back["c"], arrays["c"])
    atomic_write_json(tmp_path / "m.json", {"k": 1})
    assert load_json(tmp_path / "m.json") == {"k": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(TypeError, match="pickle"):
        atomic_save_npz(tmp_path / "o.npz", {"o": np.array([object()])})


def test_numerical_grad_complex_convention():
    z = np.array([1.0 + 2.0j, -0.5 + 0.3j])
    # L = sum |z|^2 -> dL/dRe + i dL/dIm = 2 z
    num = numerical_grad(lambda: float(np.sum(np.abs(z) ** 2)), z)
    assert grad_error(2 * z, num) < 1e-8


def test_npz_names_that_are_savez_arguments_round_trip(tmp_path):
    # np.savez(file, allow_pickle=...) would swallow or reject these names.
    arrays = {"file": np.arange(2), "allow_pickle": np.ones(3, np.float32), "layers.0.ssm.C": np.array([1j])}
    atomic_save_npz(tmp_path / "x.npz", arrays)
    back = load_npz(tmp_path / "x.npz")
    assert set(back) == set(arrays)
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value)


def test_load_npz_rejects_files_that_are_not_npz(tmp_path):
    np.save(tmp_path / "plain.npy", np.arange(3))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    for name in ("plain.npy", "broken.npz"):
        with pytest.raises(ValueError, match=name):
            load_npz(tmp_path / name)


def test_atomic_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "m.json", {"k": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644


def test_no_merge_conflict_markers_left_in_the_tree():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    files = [p for d in ("qs4d_np", "reference", "tests", "examples", "benchmarks", "docs", "validation")
             for p in (root / d).rglob("*") if p.suffix in (".py", ".md", ".v", ".cfg", ".toml")]
    files += [root / "README.md", root / "setup.cfg", root / "Makefile"]
    marked = [f"{p.relative_to(root)}:{i + 1}" for p in files
              for i, line in enumerate(p.read_text(errors="replace").splitlines())
              if line.startswith(("<<<<<<< ", ">>>>>>> "))]
    assert not marked, marked
