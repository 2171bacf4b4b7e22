import gzip
import hashlib
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
from conftest import CodeRunningPickle, cifar_python_batch, cifar_records, idx_bytes

from cnnlab.data.formats import idx_length, parse_cifar_binary, parse_cifar_python, parse_idx, read_bytes
from cnnlab.errors import DatasetError


def test_idx_round_trip():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(array), "x"), array)


def test_idx_header_claiming_huge_counts_is_refused_before_allocating():
    data = bytes([0, 0, 8, 3]) + struct.pack(">III", 10**6, 10**6, 10**6) + b"\0" * 100
    with pytest.raises(DatasetError, match=r"x\.idx: size 116 bytes but its header"):
        parse_idx(data, "x.idx")


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x01\x02", "too short"),
        (b"\x00\x00\x0d\x03" + b"\0" * 12, "not an IDX file of unsigned bytes"),
        (b"\x00\x00\x08\x03\x00", "truncated IDX header"),
    ],
)
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


def test_idx_header_with_an_empty_dimension_beside_huge_ones_is_refused():
    """Found by fuzzing: 0 x 4 x 2^30 x 2^31 holds 0 bytes, so the size check passed and numpy refused the shape."""
    data = bytes.fromhex("0000080400000000000000044000000080000000")
    with pytest.raises(
        DatasetError,
        match=r"x\.idx: its header \[0, 4, 1073741824, 2147483648\] has a dimension "
        r"of 0; an IDX dataset file is never empty",
    ):
        parse_idx(data, "x.idx")


def test_idx_length_from_the_header_alone():
    head = idx_bytes(np.zeros((3, 28, 28)))[:20]
    assert idx_length(head, "x") == 16 + 3 * 28 * 28
    with pytest.raises(DatasetError, match="truncated IDX header"):
        idx_length(head[:10], "x")


def _gzip_of(header: bytes, zeros: int) -> bytes:
    stream = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = [stream.compress(header)] + [
        stream.compress(bytes(min(1 << 20, zeros - i))) for i in range(0, zeros, 1 << 20)
    ]
    return b"".join(body) + stream.flush()


def test_a_header_claiming_more_than_the_gzip_can_hold_is_refused_before_decompressing(tmp_path, monkeypatch):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(_gzip_of(struct.pack(">IIII", 0x803, 10**7, 28, 28), 4 << 20))  # 4 KB claiming 7.8 GB
    asked = []
    real_read = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read", lambda self, n=-1: asked.append(n) or real_read(self, n))
    with pytest.raises(
        DatasetError,
        match=r"train-images-idx3-ubyte\.gz: its header claims 7,840,000,016 bytes of "
        r"content, but [\d,]+ gzip bytes can hold at most [\d,]+; the file is corrupt",
    ):
        read_bytes(path, implied_size=lambda head: idx_length(head, path))
    assert asked == [64]  # the header's bytes, nothing more
    # large enough to hold MNIST's 47 MB, yet its header claims 10 million images, not 60,000
    path.write_bytes(_gzip_of(struct.pack(">IIII", 0x803, 10**7, 28, 28) + os.urandom(1 << 16), 0))
    asked.clear()
    with pytest.raises(
        DatasetError,
        match=r"its header claims 7,840,000,016 bytes of content, but this file has "
        r"47,040,016",
    ):
        read_bytes(path, 47_040_016, implied_size=lambda head: idx_length(head, path))
    assert asked == [64]


def test_decompression_stops_just_past_the_size_the_file_should_have(tmp_path, monkeypatch):
    path = tmp_path / "labels.gz"
    path.write_bytes(_gzip_of(b"", 3 << 20))
    asked = []
    real_read = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read", lambda self, n=-1: asked.append(n) or real_read(self, n))
    with pytest.raises(DatasetError, match=r"labels\.gz: decompresses to more than the 10,008 bytes it should hold"):
        read_bytes(path, 10_008)
    assert sum(asked) == 10_009
    asked.clear()
    with pytest.raises(
        DatasetError, match=r"labels\.gz: decompresses to more than 1,048,576 bytes; not a dataset file"
    ):
        read_bytes(path, limit=1 << 20)
    assert sum(asked) == (1 << 20) + 1 and max(asked) <= 1 << 20


def test_a_known_file_of_the_wrong_size_is_refused_before_reading(tmp_path):
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(b"\0" * 3073)
    with pytest.raises(
        DatasetError,
        match=r"data_batch_1\.bin: 3,073 bytes \(decompressed\), expected 30,730,000; "
        "the file is truncated or corrupt",
    ):
        read_bytes(path, 30_730_000)
    path.write_bytes(gzip.compress(b"\0" * 3073))
    with pytest.raises(DatasetError, match=r"3,073 bytes \(decompressed\), expected 6,146"):
        read_bytes(path, 6146)
    assert read_bytes(path, 3073) == b"\0" * 3073


def test_the_digest_sees_the_bytes_on_disk(tmp_path):
    path = tmp_path / "a.gz"
    path.write_bytes(gzip.compress(b"hello" * 100))
    digest = hashlib.sha256()
    assert read_bytes(path, 500, digest=digest) == b"hello" * 100
    assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


def test_several_gzip_members_are_read_whole(tmp_path):
    path = tmp_path / "a.gz"
    path.write_bytes(gzip.compress(b"first ") + gzip.compress(b"second") + b"\0" * 8)  # zero padding, as some tools add
    assert read_bytes(path, 12) == b"first second"
