"""Atomic, pickle-free files: arrays in ``.npz``, metadata in JSON.

Every file is written to a temporary file in the destination folder and then
renamed over the target, so a crash mid-write never leaves a truncated file
and never destroys the previous version.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np


_TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            # mkstemp creates the file 0600; give it the mode a plain open() would.
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed atomic writes left in ``folder`` (``.NAME.XXXX.tmp``);
    returns them. Only for a folder no other process is writing to (e.g. a run being resumed)."""
    folder = Path(folder)
    stale = [p for p in folder.glob(f".*{_TMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink()
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays as the bytes of an uncompressed ``.npz``; object arrays are refused.

    The archive is written member by member (``<name>.npy``), so any string is a
    valid array name (``np.savez(**arrays)`` would treat ``file`` or
    ``allow_pickle`` as its own arguments).
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"array names must be non-empty strings, got {key!r}")
            value = np.asarray(value)
            if value.dtype == object:
                raise TypeError(f"array {key!r} has dtype object, which would need pickle")
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, value, allow_pickle=False)
    return buf.getvalue()


def atomic_save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Save named arrays to an uncompressed ``.npz`` atomically (see ``npz_bytes``)."""
    atomic_write_bytes(path, npz_bytes(arrays))


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` file, never unpickling."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a .npz (zip) archive")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path} is not a valid pickle-free .npz file: {exc}") from exc


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object",
               list: "a list"}


def json_get(obj: Any, keys: tuple[str, ...], source: str | os.PathLike, expected: type | tuple[type, ...]) -> Any:
    """``obj[keys[0]][keys[1]]...`` of a loaded JSON document, checked to be of type ``expected``.

    Raises ValueError naming ``source``, the dotted key and what was expected when a key is
    missing or a value has another type (an integer is not a bool; a float accepts an integer).
    """
    expected = expected if isinstance(expected, tuple) else (expected,)
    value = obj
    for depth, key in enumerate(keys):
        if not isinstance(value, dict):
            where = ".".join(keys[:depth]) or "the top level"
            raise ValueError(f"{source}: {where} is {value!r}, expected an object with key {key!r}")
        if key not in value:
            raise ValueError(f"{source}: missing key {'.'.join(keys[:depth + 1])!r}")
        value = value[key]
    allowed = expected + ((int,) if float in expected else ())
    if isinstance(value, bool) and bool not in expected or not isinstance(value, allowed):
        want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in expected)
        raise ValueError(f"{source}: key {'.'.join(keys)!r} is {value!r} ({type(value).__name__}), expected {want}")
    return value
