"""IDX files (the MNIST format), raw or gzip-compressed.

Layout: a 4-byte big-endian magic number 0x0000TTNN (TT = element type,
0x08 for unsigned bytes; NN = number of dimensions), NN big-endian uint32
sizes, then the elements in C order. Labels are 0x00000801, images
0x00000803. Compression is detected from the gzip magic bytes (1f 8b), not
from the file name.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from qs4d_np.io import atomic_write_bytes

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08


class IDXFormatError(ValueError):
    """An IDX file that is truncated, corrupt or not the kind expected."""


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise IDXFormatError(f"{path}: gzip data is truncated or corrupt ({exc})") from exc


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with ``ndim`` dimensions into a uint8 array.

    ``ndim`` = 1 for label files (magic 0x00000801), 3 for image files
    (0x00000803). Raises :class:`IDXFormatError` naming the file and what was
    expected when the magic number, the element type or the byte count is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such IDX file: {path}")
    data = _read_bytes(path)
    expected_magic = (_UBYTE << 8) | ndim
    if len(data) < 4:
        raise IDXFormatError(f"{path}: {len(data)} bytes, too short for an IDX header "
                             f"(expected magic 0x{expected_magic:08x})")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        kind = "label" if ndim == 1 else f"{ndim}-d"
        raise IDXFormatError(f"{path}: magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
                             f"(unsigned-byte {kind} IDX file)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{path}: header truncated: {len(data)} bytes, expected at least {header}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(data) - header
    if actual != expected:
        raise IDXFormatError(f"{path}: header declares shape {dims} = {expected} bytes of data, "
                             f"but the file holds {actual} ({'truncated' if actual < expected else 'trailing bytes'})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool = False) -> None:
    """Write a uint8 array as an IDX file (atomically); the inverse of :func:`read_idx`."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"array must have dtype uint8, got {array.dtype}")
    header = ((_UBYTE << 8) | array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    # mtime=0 keeps the compressed bytes reproducible (stable checksums)
    atomic_write_bytes(path, gzip.compress(data, mtime=0) if compress else data)
