"""CIFAR-10 from its binary or its "python version" batches, and the sequential layouts.

Binary version (``cifar-10-batches-bin``): ``data_batch_1.bin`` ..
``data_batch_5.bin``, ``test_batch.bin``, each 10,000 records of 3,073 bytes:
the label, then 1,024 red, 1,024 green and 1,024 blue bytes (row-major 32x32).
No pickle is involved.

Python version (``cifar-10-batches-py``): ``data_batch_1`` .. ``test_batch``
are Python 2 pickles of a dict {"batch_label": str, "labels": [int],
"data": uint8 ndarray (10000, 3072), "filenames": [str]}. They are read with
:class:`RestrictedUnpickler`, which resolves no global except the three
NumPy callables an ndarray pickle needs (``_reconstruct``, ``ndarray``,
``dtype``). Why that is safe: unpickling can only run code through globals
(the GLOBAL / STACK_GLOBAL opcodes, then REDUCE / BUILD / NEWOBJ on them); with
every other global refused, a file can build only plain containers, strings,
numbers and NumPy arrays, and ``_reconstruct`` / ``ndarray.__setstate__`` /
``dtype`` only allocate memory and copy bytes. The result is then checked to
be exactly the expected dict of a uint8 array and int labels.
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qs4d_np.core.checks import check_choice
from qs4d_np.data.sequence import SequenceDataset

RECORD_BYTES = 1 + 3 * 1024
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
# QS4D sCIFAR10 grayscale normalisation; RGB statistics from the state-spaces example
GRAY_MEAN, GRAY_STD = (122.6 / 255.0,), (61.0 / 255.0,)
RGB_MEAN, RGB_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array-rebuilding function, whatever its module
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # NumPy 1.x pickles (the CIFAR files)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # NumPy 2.x pickles
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


@dataclass
class CIFARSplit:
    """One CIFAR-10 split: ``images`` uint8 (n, 32, 32, 3) HWC, ``labels`` int64 (n,)."""

    images: np.ndarray
    labels: np.ndarray
    source: str


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except the NumPy array constructors (see module doc)."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR-10 batch holds only a dict, "
                "lists, strings and a NumPy array") from None


def _check_batch(path: Path, images_flat: np.ndarray, labels: np.ndarray) -> None:
    if labels.shape[0] != images_flat.shape[0]:
        raise ValueError(f"{path}: {images_flat.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must be 0..9, found range {labels.min()}..{labels.max()}")


def read_binary_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary batch: (images uint8 (n, 32, 32, 3), labels int64 (n,))."""
    path = Path(path)
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {RECORD_BYTES}-byte "
                         "CIFAR-10 records (label + 3x1024 pixels); truncated or not a CIFAR-10 binary batch")
    records = raw.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    _check_batch(path, records, labels)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_python_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one "python version" batch safely: (images uint8 (n, 32, 32, 3), labels int64 (n,))."""
    path = Path(path)
    try:
        # latin1 maps the Python 2 byte strings (the array's raw data) to str byte for byte
        batch = RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a readable CIFAR-10 python batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        raise ValueError(f"{path}: 'data' must be a uint8 array (n, 3072), got {got}")
    if not isinstance(labels, list) or not all(isinstance(v, int) for v in labels):
        raise ValueError(f"{path}: 'labels' must be a list of ints")
    labels = np.asarray(labels, dtype=np.int64)
    _check_batch(path, data, labels)
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def _locate(data_dir: Path) -> tuple[str, Path]:
    """Find the batches: ('binary' | 'python', folder)."""
    for folder in (data_dir, data_dir / "cifar-10-batches-bin", data_dir / "cifar-10-batches-py"):
        if (folder / "data_batch_1.bin").is_file():
            return "binary", folder
        if (folder / "data_batch_1").is_file():
            return "python", folder
    raise FileNotFoundError(
        f"no CIFAR-10 batches under {data_dir}: expected data_batch_1.bin .. test_batch.bin (binary version) "
        "or data_batch_1 .. test_batch (python version), directly or in cifar-10-batches-bin/-py. "
        "Download cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it there.")


def load_cifar10(split: str, data_dir: str | os.PathLike) -> CIFARSplit:
    """Load the ``"train"`` (50,000) or ``"test"`` (10,000) split, preferring the binary version."""
    check_choice("split", split, ("train", "test"))
    kind, folder = _locate(Path(data_dir))
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    reader = read_binary_batch if kind == "binary" else read_python_batch
    suffix = ".bin" if kind == "binary" else ""
    parts = []
    for name in names:
        path = folder / f"{name}{suffix}"
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10 {split} split needs {path}, which is missing")
        parts.append(reader(path))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return CIFARSplit(images, labels, f"cifar-10 {kind} batches in {folder}")


def to_grayscale(images: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) RGB -> uint8 (...) luma, exactly as PIL's ``convert("L")``.

    torchvision's ``Grayscale`` on the PIL images of its CIFAR10 dataset calls
    PIL, which computes the ITU-R 601-2 luma L = 0.299 R + 0.587 G + 0.114 B in
    16-bit fixed point with round-half-up: (19595 R + 38470 G + 7471 B + 2**15) >> 16.
    """
    rgb = images.astype(np.uint32)
    luma = (19595 * rgb[..., 0] + 38470 * rgb[..., 1] + 7471 * rgb[..., 2] + 32768) >> 16
    return luma.astype(np.uint8)


def cifar_sequences(split: CIFARSplit, grayscale: bool = True) -> SequenceDataset:
    """Sequential CIFAR-10, L = 1024 pixels in row-major order.

    ``grayscale``: d_in = 1, normalised with the QS4D mean 122.6/255, std
    61.0/255. Otherwise RGB, d_in = 3, with the state-spaces example's
    per-channel statistics.
    """
    n = len(split.images)
    if grayscale:
        pixels = to_grayscale(split.images).reshape(n, 1024, 1)
        return SequenceDataset(pixels, split.labels, GRAY_MEAN, GRAY_STD, None, split.source + " (grayscale)")
    return SequenceDataset(split.images.reshape(n, 1024, 3), split.labels, RGB_MEAN, RGB_STD, None,
                           split.source + " (RGB)")
