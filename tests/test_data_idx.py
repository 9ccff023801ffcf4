"""IDX reader: raw and gzip (detected by magic bytes), and clear errors for bad files."""
import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qs4d_np.data.idx import IDXFormatError, read_idx, write_idx


def _header(magic, dims):
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)


def test_raw_and_gzip_roundtrip(tmp_path, images):
    write_idx(tmp_path / "raw", images)
    write_idx(tmp_path / "packed", images, compress=True)
    assert (tmp_path / "packed").read_bytes()[:2] == b"\x1f\x8b"  # gzip without a .gz name
    np.testing.assert_array_equal(read_idx(tmp_path / "raw", ndim=3), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed", ndim=3), images)
    labels = np.arange(5, dtype=np.uint8)
    write_idx(tmp_path / "l.gz", labels, compress=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "l.gz", ndim=1), labels)


def test_hand_written_file_is_read_as_specified(tmp_path):
    # 0x00000803, dims 2 x 1 x 3, then 6 bytes in C order
    (tmp_path / "f").write_bytes(_header(0x803, (2, 1, 3)) + bytes([1, 2, 3, 4, 5, 6]))
    np.testing.assert_array_equal(read_idx(tmp_path / "f", ndim=3), [[[1, 2, 3]], [[4, 5, 6]]])


def test_truncated_data_names_file_and_sizes(tmp_path, images):
    good = _header(0x803, (5, 28, 28)) + images.tobytes()
    (tmp_path / "cut").write_bytes(good[:-10])
    with pytest.raises(IDXFormatError, match=r"cut: header declares shape \(5, 28, 28\) = 3920 bytes.*3910.*truncated"):
        read_idx(tmp_path / "cut", ndim=3)
    (tmp_path / "long").write_bytes(good + b"\x00")
    with pytest.raises(IDXFormatError, match="trailing bytes"):
        read_idx(tmp_path / "long", ndim=3)
    (tmp_path / "hdr").write_bytes(good[:9])
    with pytest.raises(IDXFormatError, match="header truncated: 9 bytes, expected at least 16"):
        read_idx(tmp_path / "hdr", ndim=3)


def test_truncated_gzip_is_clear(tmp_path, images):
    packed = gzip.compress(_header(0x803, (5, 28, 28)) + images.tobytes())
    (tmp_path / "cut.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(IDXFormatError, match="cut.gz: gzip data is truncated or corrupt"):
        read_idx(tmp_path / "cut.gz", ndim=3)


def test_wrong_magic_and_kind(tmp_path, images):
    (tmp_path / "labels").write_bytes(_header(0x801, (3,)) + bytes(3))
    with pytest.raises(IDXFormatError, match="magic number 0x00000801, expected 0x00000803"):
        read_idx(tmp_path / "labels", ndim=3)
    (tmp_path / "float").write_bytes(_header(0xD03, (1, 1, 1)) + bytes(4))  # 0x0D = float32 elements
    with pytest.raises(IDXFormatError, match="0x00000d03, expected 0x00000803"):
        read_idx(tmp_path / "float", ndim=3)
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(IDXFormatError, match="too short"):
        read_idx(tmp_path / "tiny", ndim=1)
    with pytest.raises(FileNotFoundError, match="no such IDX file"):
        read_idx(tmp_path / "missing", ndim=1)


def test_wrong_dims_vs_byte_count(tmp_path):
    (tmp_path / "dims").write_bytes(_header(0x803, (2, 28, 28)) + bytes(784))
    with pytest.raises(IDXFormatError, match=r"shape \(2, 28, 28\) = 1568 bytes.*holds 784"):
        read_idx(tmp_path / "dims", ndim=3)


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=4), compress=st.booleans(), seed=st.integers(0, 99))
def test_roundtrip_any_shape(tmp_path_factory, shape, compress, seed):
    array = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path_factory.mktemp("idx") / "f"
    write_idx(path, array, compress=compress)
    back = read_idx(path, ndim=len(shape))
    assert back.shape == tuple(shape) and np.array_equal(back, array)
