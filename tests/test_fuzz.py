"""Every parser under property-based fuzzing: IDX, both CIFAR layouts, image files, the YAML config and
the weights' JSON sidecar. Whatever the bytes, each call returns a well-formed result or raises cnnlab's
own error for that kind of file, within a second, and allocates no more than the input justifies.

100 examples per parser in the default suite, 1,000 in the slow suite.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import pickle
import signal
import struct
import tracemalloc

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from cnnlab.data.formats import parse_cifar_binary, parse_cifar_python, parse_idx, read_bytes
from cnnlab.data.images import MAX_IMAGE_PIXELS, open_image
from cnnlab.engine.config import TrainConfig, load_config
from cnnlab.engine.weights import load_weights, save_weights
from cnnlab.errors import CheckpointError, ConfigError, DatasetError, ImageError
from cnnlab.models import create_model
from conftest import cifar_python_batch, cifar_records, idx_bytes

EXAMPLES = [pytest.param(100, id="100"), pytest.param(1000, id="1000", marks=pytest.mark.slow)]


class TookTooLong(BaseException):
    """Not an Exception: the parsers turn every Exception into their own error, which would hide a hang."""


@contextlib.contextmanager
def within(seconds: float):
    """Fail an example that runs longer than `seconds` (a hang would otherwise never end)."""
    def alarm(signum, frame):
        raise TookTooLong(f"took more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def allocating_at_most(limit: int):
    """Python and numpy allocations (numpy reports to tracemalloc) must peak below `limit` bytes."""
    tracemalloc.start()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= limit, f"allocated {peak:,} bytes for an input that justifies {limit:,}"


def run(examples: int, strategy, check) -> None:
    calls = 0

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(strategy)
    def property_holds(data):
        nonlocal calls
        calls += 1
        with within(1.0):
            check(data)
    property_holds()
    assert calls >= examples


@st.composite
def mutated(draw, valid: bytes):
    """A valid file with bytes flipped, cut, inserted or a region overwritten."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(chunk)] = chunk
    return bytes(data)


def inputs(valid_files: list[bytes], structured=None):
    options = [st.binary(max_size=4096)] + [mutated(v) for v in valid_files]
    if structured is not None:
        options.append(structured)
    return st.one_of(*options)


# ---------------------------------------------------------------- IDX

@st.composite
def idx_headers(draw):
    """A well-formed IDX header with arbitrary dimensions (up to 2^32-1 each) and a body of any length."""
    ndim = draw(st.integers(1, 4))
    dims = draw(st.lists(st.integers(0, 2**32 - 1), min_size=ndim, max_size=ndim))
    body = draw(st.binary(max_size=512))
    return bytes([0, 0, 8, ndim]) + b"".join(struct.pack(">I", d) for d in dims) + body


def check_idx(data: bytes) -> None:
    with allocating_at_most(2 * len(data) + 65536):
        try:
            array = parse_idx(data, "fuzz.idx")
        except DatasetError as exc:
            assert "fuzz.idx" in str(exc)
            return
    assert array.dtype == np.uint8 and array.size == len(data) - 4 - 4 * array.ndim


@pytest.mark.parametrize("examples", EXAMPLES)
def test_idx_parser_under_fuzzing(examples):
    valid = [idx_bytes(np.arange(2 * 5 * 5).reshape(2, 5, 5)), idx_bytes(np.arange(7))]
    run(examples, inputs(valid, idx_headers()), check_idx)


def test_idx_header_claiming_a_trillion_items_is_refused_before_allocating():
    data = bytes([0, 0, 8, 3]) + struct.pack(">III", 10**6, 10**3, 10**3) + b"\0" * 100
    with allocating_at_most(65536), within(1.0), pytest.raises(DatasetError, match="header"):
        parse_idx(data, "huge.idx")


def test_gzip_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:  # 600 MiB of zeros in under 1 MiB
        for _ in range(600):
            f.write(b"\0" * (1 << 20))
    with pytest.raises(DatasetError, match="more than 512 MiB"):
        read_bytes(path)


# ---------------------------------------------------------------- CIFAR, binary and python

@st.composite
def cifar_binary_sized(draw):
    """Lengths near whole records, where a parser is most tempted to accept."""
    records = draw(st.integers(0, 3))
    extra = draw(st.integers(-3, 3))
    return draw(st.binary(min_size=max(records * 3073 + extra, 0), max_size=max(records * 3073 + extra, 0)))


def check_cifar_binary(data: bytes) -> None:
    for label_bytes in (1, 2):
        with allocating_at_most(2 * len(data) + 65536):
            try:
                images, labels = parse_cifar_binary(data, "fuzz.bin", label_bytes)
            except DatasetError as exc:
                assert "fuzz.bin" in str(exc)
                continue
        assert images.shape[1:] == (3, 32, 32) and labels.shape == (len(images),)
        assert len(images) * (3072 + label_bytes) == len(data)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_cifar_binary_parser_under_fuzzing(examples):
    valid = [cifar_records(2)[0], cifar_records(1, label_bytes=2)[0]]
    run(examples, inputs(valid, cifar_binary_sized()), check_cifar_binary)


plain_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20)


@st.composite
def cifar_like_pickles(draw):
    """Pickles of dicts shaped like a CIFAR batch with wrong types, shapes and dtypes in them."""
    shape = draw(st.tuples(st.integers(0, 4), st.sampled_from([3072, 3071, 1, 0])))
    dtype = draw(st.sampled_from([np.uint8, np.int16, np.float32, np.int64]))
    batch = {"data": np.zeros(shape, dtype=dtype) if draw(st.booleans()) else draw(plain_values),
             draw(st.sampled_from(["labels", "fine_labels", "other"])): draw(plain_values)}
    return pickle.dumps(batch, protocol=draw(st.integers(0, pickle.HIGHEST_PROTOCOL)))


def check_cifar_python(data: bytes) -> None:
    with allocating_at_most(4 * len(data) + 262144):
        try:
            images, labels = parse_cifar_python(data, "fuzz_batch", "labels")
        except DatasetError as exc:
            assert "fuzz_batch" in str(exc)
            return
    assert images.dtype == np.uint8 and images.shape[1:] == (3, 32, 32) and labels.shape == (len(images),)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_cifar_python_parser_under_fuzzing(examples):
    valid = [cifar_python_batch(2)[0], pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [3]})]
    run(examples, inputs(valid, cifar_like_pickles()), check_cifar_python)


class _LyingArray:
    """Pickles as numpy's array reconstructor called with a shape of 2^60 bytes."""

    def __reduce__(self):
        core = getattr(np, "_core", None) or np.core
        return core.multiarray._reconstruct, (np.ndarray, (2**30, 2**30), b"b")


def test_a_pickle_opcode_claiming_200_mb_allocates_nothing():
    stream = b"\x80\x02B" + struct.pack("<I", 200_000_000) + b"only a few bytes follow"
    with allocating_at_most(1 << 20), pytest.raises(DatasetError, match="not a readable CIFAR python batch"):
        parse_cifar_python(stream, "short_batch", "labels")


class _DirectArray:
    """Pickles as a direct call of numpy.ndarray with a shape of 2^40 bytes."""

    def __reduce__(self):
        return np.ndarray, ((2**20, 2**20), "u1")


def test_a_pickle_calling_ndarray_directly_is_refused():
    stream = pickle.dumps({"data": _DirectArray(), "labels": []}, protocol=2)
    with allocating_at_most(1 << 20), pytest.raises(DatasetError, match="calling numpy.ndarray directly"):
        parse_cifar_python(stream, "direct_batch", "labels")


def test_a_pickled_array_whose_shape_exceeds_the_file_allocates_nothing():
    stream = pickle.dumps({"data": _LyingArray(), "labels": []}, protocol=2)
    with allocating_at_most(1 << 20), pytest.raises(DatasetError, match="cannot come from"):
        parse_cifar_python(stream, "lying_batch", "labels")


# ---------------------------------------------------------------- images

def _encoded(fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)).convert(mode) \
        .save(buffer, format=fmt)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels; the pixel data is a few bytes."""
    import zlib
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_an_image_header_claiming_ten_billion_pixels_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(100_000, 100_000))
    with within(1.0), pytest.raises(ImageError, match=f"bomb.png: .*pixels.*{MAX_IMAGE_PIXELS:,}: shrink it first"):
        open_image(path)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_image_decoding_under_fuzzing(examples, tmp_path):
    valid = [_encoded("PNG"), _encoded("JPEG"), _encoded("BMP"), _encoded("GIF", "P"), _encoded("PNG", "L"),
             _png_claiming(30_000, 30_000), _png_claiming(9_000, 9_000)]
    path = tmp_path / "fuzz.img"

    def check(data: bytes) -> None:
        path.write_bytes(data)
        try:
            image = open_image(path)
        except ImageError as exc:
            assert "fuzz.img" in str(exc)
            return
        assert image.width * image.height <= MAX_IMAGE_PIXELS
        np.asarray(image.convert("RGB"))  # a decoded image converts
    run(examples, inputs(valid), check)


# ---------------------------------------------------------------- YAML config

config_keys = st.sampled_from(list(TrainConfig.__dataclass_fields__) + ["lr ", "epoch", "", "model_arg"])


@st.composite
def config_documents(draw):
    values = draw(st.dictionaries(config_keys | st.integers() | st.booleans(), plain_values, max_size=6))
    return yaml.safe_dump(values).encode()


@pytest.mark.parametrize("examples", EXAMPLES)
def test_yaml_config_under_fuzzing(examples, tmp_path):
    valid = [b"model: resnet20\nepochs: 3\nlr: 0.1\nmodel_args: {num_classes: 10}\n",
             b"dataset: cifar10\nmilestones: [1, 2]\nschedule: multistep\n"]
    path = tmp_path / "fuzz.yaml"

    def check(data: bytes) -> None:
        path.write_bytes(data)
        try:
            load_config(path).validate()
        except ConfigError as exc:  # and nothing else may come out of a config
            assert str(exc)
    run(examples, inputs(valid, config_documents()) | st.text(max_size=300).map(str.encode), check)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10^9 leaves
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines))
    with within(1.0), pytest.raises(ConfigError, match="bomb.yaml: not valid YAML.*aliases"):
        load_config(path)


# ---------------------------------------------------------------- weights sidecar

@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sidecar")
    model = create_model("cnn", spec="c4,p,f8", in_channels=1, num_classes=3, input_size=8)
    meta = {"model": "cnn", "model_args": {"spec": "c4,p,f8", "in_channels": 1, "num_classes": 3,
                                           "input_size": [8, 8]},
            "classes": ["a", "b", "c"], "mean": [0.5], "std": [0.25], "input_shape": [1, 8, 8]}
    save_weights(model, folder / "model.safetensors", meta)
    # PyTorch imports sympy and dynamo (1-3 s) the first time a shape check fails on the meta device: a
    # one-off import, not parsing time, so it is paid here rather than inside the first timed example
    for shape in ([1, 2, 2], [1, 9, 9], [1, 8, 8]):
        (folder / "model.json").write_text(json.dumps({**meta, "input_shape": shape}))
        with contextlib.suppress(CheckpointError):
            load_weights(folder / "model.safetensors")
    (folder / "model.json").write_text(json.dumps(meta))
    return folder / "model.safetensors", meta


@st.composite
def damaged_sidecars(draw, meta: dict):
    meta = json.loads(json.dumps(meta))
    for _ in range(draw(st.integers(1, 3))):
        nested = isinstance(meta.get("model_args"), dict) and draw(st.booleans())
        target = meta["model_args"] if nested else meta
        key = draw(st.sampled_from(sorted(target) + ["resize", "extra"]))
        if draw(st.integers(0, 5)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(plain_values | st.integers(-2**40, 2**40))
    return json.dumps(meta, default=repr).encode()


@pytest.mark.parametrize("examples", EXAMPLES)
def test_weights_sidecar_under_fuzzing(examples, weights_file):
    weights, meta = weights_file
    sidecar = weights.with_suffix(".json")
    good = json.dumps(meta).encode()

    def check(data: bytes) -> None:
        sidecar.write_bytes(data)
        with allocating_at_most(16 << 20):
            try:
                loaded = load_weights(weights)
            except CheckpointError as exc:
                assert "model." in str(exc)
                return
        assert len(loaded.classes) == 3 and sum(p.numel() for p in loaded.model.parameters()) > 0
    try:
        run(examples, inputs([good], damaged_sidecars(meta)), check)
    finally:
        sidecar.write_bytes(good)


def test_a_sidecar_claiming_a_billion_classes_allocates_nothing(weights_file):
    weights, meta = weights_file
    sidecar = weights.with_suffix(".json")
    try:
        sidecar.write_text(json.dumps({**meta, "model_args": {**meta["model_args"], "num_classes": 10**9}}))
        with within(1.0), pytest.raises(CheckpointError, match="do not belong together"):
            load_weights(weights)
    finally:
        sidecar.write_text(json.dumps(meta))
