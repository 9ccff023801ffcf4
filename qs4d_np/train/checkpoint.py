"""Checkpoints: arrays in ``.npz``, metadata in JSON, switched atomically as a pair.

A checkpoint ``tag`` in a folder is two files:

* ``<tag>-e<epoch>-<sha>.npz``: the arrays (never pickled), named after the
  epoch and the first 12 hex digits of their SHA-256, so a new checkpoint never
  overwrites the file the current metadata names (not even when the same epoch
  is saved again with other contents);
* ``<tag>.json``: the metadata, naming that ``.npz`` and its SHA-256. Renaming
  it into place is the commit point; afterwards this tag's older arrays files
  are removed (only this tag's: ``run`` never touches ``run-eval``'s). A crash
  at any moment leaves either the old or the new pair.

The module also collects the state a model carries besides its parameters:
``buffers`` dicts (BatchNorm running statistics) and ``np.random.Generator``
attributes (dropout masks), found on every submodule.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from qs4d_np.io import atomic_write_bytes, atomic_write_json, load_json, load_npz, npz_bytes


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or does not fit the current run."""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(folder: str | os.PathLike, tag: str, epoch: int, arrays: Mapping[str, np.ndarray],
                    meta: Mapping[str, Any]) -> Path:
    """Write ``arrays`` + ``meta`` as checkpoint ``tag``; returns the JSON path."""
    folder = Path(folder)
    data = npz_bytes(arrays)
    sha = hashlib.sha256(data).hexdigest()
    npz = folder / f"{tag}-e{epoch:04d}-{sha[:12]}.npz"
    atomic_write_bytes(npz, data)
    record = dict(meta, arrays_file=npz.name, arrays_sha256=sha)
    json_path = folder / f"{tag}.json"
    atomic_write_json(json_path, record)
    remove_stale_arrays(folder, tag, keep=npz.name)
    return json_path


def remove_stale_arrays(folder: str | os.PathLike, tag: str, keep: str | None = None) -> list[Path]:
    """Delete this tag's arrays files other than ``keep`` (default: the one ``<tag>.json`` names),
    e.g. those a run killed between a commit and its cleanup left; returns them."""
    folder = Path(folder)
    if keep is None:
        keep = load_checkpoint_meta(folder, tag)["arrays_file"]
    own = re.compile(re.escape(tag) + r"-e\d{4,}(-[0-9a-f]{12})?\.npz")
    stale = [p for p in folder.glob(f"{tag}-e*.npz") if p.name != keep and own.fullmatch(p.name)]
    for path in stale:
        path.unlink()
    return stale


def load_checkpoint_meta(folder: str | os.PathLike, tag: str) -> dict[str, Any]:
    """The metadata of checkpoint ``tag`` (its arrays file not read). Raises :class:`CheckpointError`
    when missing or not checkpoint metadata."""
    json_path = Path(folder) / f"{tag}.json"
    if not json_path.is_file():
        raise CheckpointError(f"no checkpoint {json_path}")
    try:
        meta = load_json(json_path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(meta, dict) or not {"arrays_file", "arrays_sha256"} <= set(meta):
        raise CheckpointError(f"{json_path} is not checkpoint metadata (no arrays_file / arrays_sha256)")
    name = meta["arrays_file"]
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(f"{json_path} names arrays file {name!r}; expected a file name in the same folder")
    if not isinstance(meta["arrays_sha256"], str):
        raise CheckpointError(f"{json_path}: key 'arrays_sha256' is {meta['arrays_sha256']!r}, expected a hex string")
    return meta


def load_checkpoint(folder: str | os.PathLike, tag: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read checkpoint ``tag``: (arrays, meta). Raises :class:`CheckpointError` when missing or damaged."""
    json_path = Path(folder) / f"{tag}.json"
    meta = load_checkpoint_meta(folder, tag)
    npz = json_path.parent / meta["arrays_file"]
    if not npz.is_file():
        raise CheckpointError(f"{json_path} names {npz.name}, which is missing")
    digest = _file_sha256(npz)
    if digest != meta["arrays_sha256"]:
        raise CheckpointError(f"{npz} has SHA-256 {digest}, but {json_path} recorded {meta['arrays_sha256']}")
    return load_npz(npz), meta


def load_model_arrays(folder: str | os.PathLike, tag: str = "best") -> dict[str, np.ndarray]:
    """A trainer checkpoint's ``params/`` and ``buffers/`` arrays (no optimizer state), ready for
    ``S4DModel.load_arrays``: e.g. the float model that post-training quantization starts from."""
    arrays, _ = load_checkpoint(folder, tag)
    return {k: v for k, v in arrays.items() if k.startswith(("params/", "buffers/"))}


def checkpoint_exists(folder: str | os.PathLike, tag: str) -> bool:
    return (Path(folder) / f"{tag}.json").is_file()


# -- model state besides parameters ----------------------------------------
def _modules(model: Any) -> Iterator[tuple[str, Any]]:
    """(dotted name, module) pairs; a model without ``modules()`` is one module."""
    return model.modules() if hasattr(model, "modules") else iter([("", model)])


def model_buffers(model: Any) -> dict[str, np.ndarray]:
    """Every submodule's ``buffers`` entries as ``<module>.<name>`` (shared arrays)."""
    out = {}
    for prefix, module in _modules(model):
        buffers = getattr(module, "buffers", None)
        if isinstance(buffers, dict):
            for key, value in buffers.items():
                out[f"{prefix}.{key}" if prefix else key] = value
    return out


def model_generators(model: Any) -> dict[str, np.random.Generator]:
    """Every ``np.random.Generator`` attribute of every submodule as ``<module>:<attribute>``."""
    out = {}
    for prefix, module in _modules(model):
        for attr, value in vars(module).items():
            if isinstance(value, np.random.Generator):
                out[f"{prefix}:{attr}"] = value
    return out


def to_jsonable(obj: Any) -> Any:
    """A JSON-ready copy of a config: objects with ``to_dict()`` (QuantConfig) and dataclasses
    become dicts, tuples lists, NumPy scalars numbers, paths strings."""
    def default(o: Any) -> Any:
        if callable(getattr(o, "to_dict", None)):
            return o.to_dict()
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"cannot store {type(o).__name__} {o!r} in checkpoint metadata")
    return json.loads(json.dumps(obj, default=default))


def config_differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON values (nested dicts compared key by key)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        diffs = []
        for key in sorted(set(saved) | set(current)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in saved:
                diffs.append(f"{sub}: not in the checkpoint, now {current[key]!r}")
            elif key not in current:
                diffs.append(f"{sub}: {saved[key]!r} in the checkpoint, absent now")
            else:
                diffs.extend(config_differences(saved[key], current[key], sub))
        return diffs
    return [] if saved == current else [f"{path}: {saved!r} in the checkpoint, {current!r} now"]
