import gzip
import pickle
import struct

import numpy as np
import pytest

from cnnlab.data.formats import parse_cifar_binary, parse_cifar_python, parse_idx, read_bytes
from cnnlab.errors import DatasetError

from conftest import CodeRunningPickle, cifar_python_batch, cifar_records, idx_bytes


def test_idx_round_trip():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(array), "x"), array)


def test_idx_header_claiming_huge_counts_is_refused_before_allocating():
    data = bytes([0, 0, 8, 3]) + struct.pack(">III", 10**6, 10**6, 10**6) + b"\0" * 100
    with pytest.raises(DatasetError, match=r"x\.idx: size 116 bytes but its header"):
        parse_idx(data, "x.idx")


@pytest.mark.parametrize("data, message", [
    (b"\x01\x02", "too short"),
    (b"\x00\x00\x0d\x03" + b"\0" * 12, "not an IDX file of unsigned bytes"),
    (b"\x00\x00\x08\x03\x00", "truncated IDX header"),
])
def test_idx_malformed(data, message):
    with pytest.raises(DatasetError, match=message):
        parse_idx(data, "f")


def test_gzip_is_detected_by_content_and_corruption_named(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(gzip.compress(b"hello"))
    assert read_bytes(path) == b"hello"
    path.write_bytes(gzip.compress(b"hello" * 1000)[:20])
    with pytest.raises(DatasetError, match=r"a\.bin: corrupt or truncated gzip"):
        read_bytes(path)


def test_cifar_binary_layouts():
    data, images, labels = cifar_records(5)
    x, y = parse_cifar_binary(data, "b", label_bytes=1)
    assert np.array_equal(x, images) and np.array_equal(y, labels)
    data100, images100, labels100 = cifar_records(3, label_bytes=2)
    x, y = parse_cifar_binary(data100, "b", label_bytes=2)  # coarse byte first, fine label second
    assert np.array_equal(x, images100) and np.array_equal(y, labels100)
    with pytest.raises(DatasetError, match="not a whole number of 3073-byte"):
        parse_cifar_binary(data[:-1], "b", label_bytes=1)


def test_cifar_python_batch_through_the_restricted_unpickler():
    blob, data, labels = cifar_python_batch(6)
    x, y = parse_cifar_python(blob, "data_batch_1", "labels")
    assert np.array_equal(x.reshape(6, -1), data) and y.tolist() == labels


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({"data": CodeRunningPickle(marker), "labels": []}, protocol=2)
    with pytest.raises(DatasetError, match="refused: global 'io.open' is not allowed|refused: global 'builtins"):
        parse_cifar_python(blob, "data_batch_1", "labels")
    assert not marker.exists()


def test_cifar_python_wrong_content():
    with pytest.raises(DatasetError, match="'data' is not an"):
        parse_cifar_python(pickle.dumps({"data": [1, 2], "labels": [0]}, protocol=2), "b", "labels")
    with pytest.raises(DatasetError, match="not a readable CIFAR python batch"):
        parse_cifar_python(b"garbage", "b", "labels")
