"""CIFAR-10: binary batches, the restricted unpickler for python batches, grayscale, layouts."""
import io
import pickle

import numpy as np
import pytest
from PIL import Image

from qs4d_np.data.cifar import (GRAY_MEAN, GRAY_STD, RGB_MEAN, RECORD_BYTES, cifar_sequences, load_cifar10,
                                read_binary_batch, read_python_batch, to_grayscale)

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, size=n)


def _write_binary(path, images, labels):
    # record = label byte, then the R, G, B planes, each 32x32 row-major
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    path.write_bytes(np.concatenate([labels.astype(np.uint8)[:, None], planes], axis=1).tobytes())


def _python_batch_bytes(images, labels, byte_keys=False, numpy1_names=False):
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    batch = {"batch_label": "testing batch", "labels": [int(v) for v in labels], "data": data,
             "filenames": [f"img_{i}.png" for i in range(len(images))]}
    if byte_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    raw = pickle.dumps(batch, protocol=3)
    if numpy1_names:  # how the original (NumPy 1.x) files name the array constructor
        assert b"cnumpy._core.multiarray\n" in raw
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return raw


class _Py2Pickler(pickle._Pickler):
    """Writes bytes the way Python 2 wrote its str: BINSTRING opcodes (no _codecs.encode call),
    so the output has the shape of the original CIFAR-10 python batches."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _py2_batch_bytes(images, labels):
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in labels], b"data": data,
             b"filenames": [b"img_%d.png" % i for i in range(len(images))]}
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(batch)
    raw = buf.getvalue()
    assert b"_codecs" not in raw and b"cnumpy._core.multiarray\n" in raw
    return raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def test_python2_style_batch(tmp_path):
    # the array's raw bytes arrive as a latin1-decoded str, as with the real Python 2 files
    images, labels = _images(3, 4)
    (tmp_path / "data_batch_1").write_bytes(_py2_batch_bytes(images, labels))
    got_images, got_labels = read_python_batch(tmp_path / "data_batch_1")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_binary_batch(tmp_path):
    images, labels = _images(4, 0)
    _write_binary(tmp_path / "b.bin", images, labels)
    got_images, got_labels = read_binary_batch(tmp_path / "b.bin")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    raw = (tmp_path / "b.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:-5])
    with pytest.raises(ValueError, match=f"cut.bin: {4 * RECORD_BYTES - 5} bytes is not a whole number"):
        read_binary_batch(tmp_path / "cut.bin")
    (tmp_path / "lab.bin").write_bytes(bytes([12]) + raw[1:])
    with pytest.raises(ValueError, match="labels must be 0..9"):
        read_binary_batch(tmp_path / "lab.bin")


@pytest.mark.parametrize("byte_keys,numpy1_names", [(False, False), (True, True)])
def test_python_batch(tmp_path, byte_keys, numpy1_names):
    images, labels = _images(3, 1)
    (tmp_path / "p").write_bytes(_python_batch_bytes(images, labels, byte_keys, numpy1_names))
    got_images, got_labels = read_python_batch(tmp_path / "p")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if it ran


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil").write_bytes(pickle.dumps({"data": _Evil(str(marker))}, protocol=3))
    with pytest.raises(ValueError, match=r"refusing to load global (builtins|io)\.open"):
        read_python_batch(tmp_path / "evil")
    assert not marker.exists()
    (tmp_path / "wrong").write_bytes(pickle.dumps({"data": np.zeros((2, 3072)), "labels": [0, 1]}, protocol=3))
    with pytest.raises(ValueError, match=r"'data' must be a uint8 array \(n, 3072\), got float64"):
        read_python_batch(tmp_path / "wrong")


@pytest.mark.parametrize("kind", ["binary", "python"])
def test_load_splits(tmp_path, kind):
    folder = tmp_path / ("cifar-10-batches-bin" if kind == "binary" else "cifar-10-batches-py")
    folder.mkdir()
    expected = {}
    for i, name in enumerate(BATCHES):
        images, labels = _images(2, 10 + i)
        expected[name] = (images, labels)
        if kind == "binary":
            _write_binary(folder / f"{name}.bin", images, labels)
        else:
            (folder / name).write_bytes(_python_batch_bytes(images, labels))
    train = load_cifar10("train", tmp_path)
    assert train.images.shape == (10, 32, 32, 3) and kind in train.source
    np.testing.assert_array_equal(train.images[4:6], expected["data_batch_3"][0])
    np.testing.assert_array_equal(load_cifar10("test", tmp_path).labels, expected["test_batch"][1])
    (folder / ("data_batch_5.bin" if kind == "binary" else "data_batch_5")).unlink()
    with pytest.raises(FileNotFoundError, match="needs .*data_batch_5"):
        load_cifar10("train", tmp_path)


def test_missing_folder_says_how_to_get_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)no CIFAR-10 batches.*cifar-10-binary.tar.gz"):
        load_cifar10("train", tmp_path)


def test_grayscale_matches_pil():
    images, _ = _images(6, 2)
    expected = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in images])
    np.testing.assert_array_equal(to_grayscale(images), expected)


def test_sequence_layouts(tmp_path):
    images, labels = _images(3, 3)
    _write_binary(tmp_path / "test_batch.bin", images, labels)
    _write_binary(tmp_path / "data_batch_1.bin", images, labels)
    split = load_cifar10("test", tmp_path)
    gray = cifar_sequences(split, grayscale=True)
    x, y = gray.batch(np.array([1]))
    assert x.shape == (1, 1024, 1) and x.dtype == np.float32
    luma = to_grayscale(images[1]).reshape(-1).astype(np.float64)
    np.testing.assert_allclose(x[0, :, 0], (luma / 255 - GRAY_MEAN[0]) / GRAY_STD[0], rtol=0, atol=1e-5)
    rgb = cifar_sequences(split, grayscale=False)
    x, _ = rgb.batch(np.array([1]))
    assert x.shape == (1, 1024, 3)
    # time step t is pixel (t // 32, t % 32); channel c is the colour plane
    t = 5 * 32 + 7
    np.testing.assert_allclose(x[0, t], (images[1, 5, 7] / 255 - np.array(RGB_MEAN)) / rgb.std, atol=1e-5)
    np.testing.assert_array_equal(y, labels[[1]])
