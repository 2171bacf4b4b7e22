"""Every parser under property-based fuzzing: IDX, both CIFAR layouts, image files, the YAML config and
the weights' JSON sidecar. Whatever the bytes, each call returns a well-formed result or raises cnnlab's
own error for that kind of file, within a second of CPU time, and its peak resident memory grows by no
more than a few MB plus a small multiple of the input's size.

The default suite replays a fixed seed (conftest's "ci" profile): 100 examples per parser, 1,000 in the
slow suite. `make fuzz` draws fresh seeds and many more examples; what it finds becomes a fixed regression
example here. The known bombs are each refused in a forked child whose peak RSS is measured.
"""

from __future__ import annotations

import contextlib
import ctypes
import gzip
import io
import json
import os
import pickle
import re
import resource
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import cifar_python_batch, cifar_records, idx_bytes
from hostile import sample, scan_bomb, small_jpeg, tar_member, write_shards
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnlab.data import load_dataset, transforms
from cnnlab.data.formats import idx_length, parse_cifar_binary, parse_cifar_python, parse_idx, read_bytes
from cnnlab.data.images import ENVIRONMENT, MAX_IMAGE_PIXELS, open_image
from cnnlab.data.shards import ShardLoader, open_shards
from cnnlab.errors import CheckpointError, ConfigError, DatasetError, ImageError
from cnnlab.inference.predict import load_image
from cnnlab.inference.weights import load_weights, save_weights
from cnnlab.models import create_model
from cnnlab.training.config import TrainConfig, load_config

EXAMPLES = [pytest.param(100, id="100"), pytest.param(1000, id="1000", marks=pytest.mark.slow)]
MiB = 1 << 20
CPU_SECONDS = 1.0  # per example and per bomb
WALL_SECONDS = 2.0  # per bomb, in its own process
# Peak RSS growth allowed for an input of n bytes: slack + GROWTH_PER_BYTE * n; a bomb needs hundreds of MB.
# In a forked child a refused bomb grows by under 2 MiB. Within the test process the allocator's history adds
# noise (a reused heap chunk is zeroed, so touched, where fresh memory is not), hence the wider slack there.
SLACK = 4 * MiB
SLACK_IN_PROCESS = 8 * MiB
GROWTH_PER_BYTE = 4


class TookTooLong(BaseException):
    """Not an Exception: the parsers turn every Exception into their own error, which would hide a hang."""


@contextlib.contextmanager
def within(cpu_seconds: float, wall_seconds: float = 30.0):
    """Fail a block that uses more than `cpu_seconds` of this process's CPU time (user and system, all
    threads): work done, which other processes on a shared machine do not inflate, unlike wall time. A
    block that hangs without using CPU is stopped by the generous wall-clock backstop."""

    def stop(signum, frame):
        what = f"{cpu_seconds} s of CPU time" if signum == signal.SIGPROF else f"{wall_seconds} s of wall time"
        raise TookTooLong(f"took more than {what}")

    previous = signal.signal(signal.SIGPROF, stop), signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_PROF, cpu_seconds)
    signal.setitimer(signal.ITIMER_REAL, wall_seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGPROF, previous[0])
        signal.signal(signal.SIGALRM, previous[1])


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now, VmHWM: peak), in KiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak_rss() -> bool:
    """Linux resets VmHWM to the current RSS when 5 is written to /proc/self/clear_refs (since 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


CAN_MEASURE_RSS = _reset_peak_rss()
try:  # glibc hands freed heap pages back to the system, so that each measured block starts from the same state
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # another C library: growth may then be under-counted, never over-counted

    def _malloc_trim(pad: int) -> int:
        return 0


@contextlib.contextmanager
def peak_rss_growth_at_most(limit: int):
    """The block's peak resident memory may exceed what was resident at its start by at most `limit` bytes.
    RSS sees every allocation that is used (Python, numpy, torch, PIL, zlib), which tracemalloc does not;
    where the peak cannot be reset, tracemalloc (Python and numpy only) is the fallback."""
    if not CAN_MEASURE_RSS:
        tracemalloc.start()
        try:
            yield
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak <= limit, f"allocated {peak:,} bytes (tracemalloc) where {limit:,} are allowed"
        return
    _malloc_trim(0)
    _reset_peak_rss()
    start = _status_kib("VmRSS")
    yield
    growth = (_status_kib("VmHWM") - start) * 1024
    assert growth <= limit, f"peak RSS grew by {growth:,} bytes where {limit:,} are allowed"


def allowed_growth(size: int, slack: int = SLACK_IN_PROCESS) -> int:
    return slack + GROWTH_PER_BYTE * size


def run(examples: int, strategy, check, regressions: tuple = ()) -> None:
    """`check` holds for `examples` drawn inputs (more under `make fuzz`) and for every regression example."""
    calls = 0

    @settings(
        max_examples=max(examples, settings().max_examples),
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )
    @given(strategy)
    def property_holds(data):
        nonlocal calls
        calls += 1
        with within(CPU_SECONDS):
            check(data)

    for data in regressions:
        property_holds = example(data)(property_holds)
    property_holds()
    assert calls >= examples + len(regressions)


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
            data[pos : pos + len(chunk)] = chunk
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


# Inputs fuzzing found that once broke a parser; each is replayed in every run.
IDX_REGRESSIONS = (
    bytes.fromhex("0000080400000000000000044000000080000000"),  # 0 x 4 x 2^30 x 2^31: numpy refused it
)


def check_idx(data: bytes) -> None:
    with peak_rss_growth_at_most(allowed_growth(len(data))):
        try:
            array = parse_idx(data, "fuzz.idx")
        except DatasetError as exc:
            assert "fuzz.idx" in str(exc)
            return
    assert array.dtype == np.uint8 and array.size == len(data) - 4 - 4 * array.ndim


@pytest.mark.parametrize("examples", EXAMPLES)
def test_idx_parser_under_fuzzing(examples):
    valid = [idx_bytes(np.arange(2 * 5 * 5).reshape(2, 5, 5)), idx_bytes(np.arange(7))]
    run(examples, inputs(valid, idx_headers()), check_idx, IDX_REGRESSIONS)


def check_idx_gzip(data: bytes, path: Path) -> None:
    """The same through read_bytes with the header check, as datasets.py reads an IDX file."""
    path.write_bytes(gzip.compress(data, compresslevel=1))
    with peak_rss_growth_at_most(allowed_growth(len(data))):
        try:
            array = parse_idx(read_bytes(path, implied_size=lambda head: idx_length(head, path)), path)
        except DatasetError as exc:
            assert str(path) in str(exc)
            return
    assert array.dtype == np.uint8 and array.size == len(data) - 4 - 4 * array.ndim


@pytest.mark.parametrize("examples", EXAMPLES)
def test_gzipped_idx_under_fuzzing(examples, tmp_path):
    valid = [idx_bytes(np.arange(2 * 5 * 5).reshape(2, 5, 5)), idx_bytes(np.arange(7))]
    run(
        examples,
        inputs(valid, idx_headers()),
        lambda data: check_idx_gzip(data, tmp_path / "fuzz.idx.gz"),
        IDX_REGRESSIONS,
    )


# ---------------------------------------------------------------- CIFAR, binary and python


@st.composite
def cifar_binary_sized(draw):
    """Lengths near whole records, where a parser is most tempted to accept."""
    records = draw(st.integers(0, 3))
    extra = draw(st.integers(-3, 3))
    return draw(st.binary(min_size=max(records * 3073 + extra, 0), max_size=max(records * 3073 + extra, 0)))


def check_cifar_binary(data: bytes) -> None:
    for label_bytes in (1, 2):
        with peak_rss_growth_at_most(allowed_growth(len(data))):
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
    max_leaves=20,
)


@st.composite
def cifar_like_pickles(draw):
    """Pickles of dicts shaped like a CIFAR batch with wrong types, shapes and dtypes in them."""
    shape = draw(st.tuples(st.integers(0, 4), st.sampled_from([3072, 3071, 1, 0])))
    dtype = draw(st.sampled_from([np.uint8, np.int16, np.float32, np.int64]))
    batch = {
        "data": np.zeros(shape, dtype=dtype) if draw(st.booleans()) else draw(plain_values),
        draw(st.sampled_from(["labels", "fine_labels", "other"])): draw(plain_values),
    }
    return pickle.dumps(batch, protocol=draw(st.integers(0, pickle.HIGHEST_PROTOCOL)))


def check_cifar_python(data: bytes) -> None:
    with peak_rss_growth_at_most(allowed_growth(len(data))):
        try:
            images, labels = parse_cifar_python(data, "fuzz_batch", "labels")
        except DatasetError as exc:
            assert "fuzz_batch" in str(exc)
            return
    assert images.dtype == np.uint8 and images.shape[1:] == (3, 32, 32) and labels.shape == (len(images),)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_cifar_python_parser_under_fuzzing(examples):
    valid = [cifar_python_batch(2)[0], pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [3]})]
    # found by `make fuzz`: a memo slot far beyond the values stored (LONG_BINPUT 175,399,797) made the C
    # unpickler allocate a 1.4 GB memo table, 2 s of CPU for 10 bytes
    memo_bomb = b"\x80\x02}r" + struct.pack("<I", 175_399_797) + b"."
    run(examples, inputs(valid, cifar_like_pickles()), check_cifar_python, regressions=(memo_bomb,))


# ---------------------------------------------------------------- images


def _encoded(fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)).convert(mode).save(
        buffer, format=fmt
    )
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels; the pixel data is a few bytes."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _claimed_pixels(path: Path) -> int:
    """The pixels an image file's header claims, read without decoding (0 where PIL cannot tell)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                return im.width * im.height
    except Exception:  # noqa: BLE001 - any header PIL cannot read claims nothing
        return 0


@pytest.mark.parametrize("examples", EXAMPLES)
def test_image_decoding_under_fuzzing(examples, tmp_path):
    valid = [
        _encoded("PNG"),
        _encoded("JPEG"),
        _encoded("BMP"),
        _encoded("GIF", "P"),
        _encoded("PNG", "L"),
        _png_claiming(30_000, 30_000),
        _png_claiming(9_000, 9_000),
    ]
    path = tmp_path / "fuzz.img"
    Image.init()  # PIL imports its 40-odd format plugins on the first file of a rarer format: once, not per input

    def check(data: bytes) -> None:
        path.write_bytes(data)
        # open_image allocates the whole image its header claims (up to 64 MP of 4 bytes) before decoding a
        # pixel, then copies it; the allocator decides how much of that is touched. That much, and no more.
        claimed = min(_claimed_pixels(path), MAX_IMAGE_PIXELS)
        with peak_rss_growth_at_most(allowed_growth(len(data)) + 2 * 4 * claimed):
            try:
                image = open_image(path)
            except ImageError as exc:
                assert "fuzz.img" in str(exc)
                return
        assert image.width * image.height <= MAX_IMAGE_PIXELS
        np.asarray(image.convert("RGB"))  # a decoded image converts

    run(examples, inputs(valid), check)


def _jpeg(width: int, height: int, mode: str = "RGB", **options) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=80, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("examples", EXAMPLES)
def test_streaming_crops_under_fuzzing(examples):
    """decode_crop, the streaming path: damaged JPEGs go through region decoding (C, over libjpeg-turbo) and
    the whole-image decoders; each call returns a crop or raises ImageError naming the file."""
    valid = [
        _jpeg(40, 30),
        _jpeg(33, 47, subsampling=0),
        _jpeg(48, 40, progressive=True),
        _jpeg(40, 24, restart_marker_blocks=2),
        _jpeg(30, 30, "L"),
        _jpeg(24, 20, "CMYK"),
    ]

    def check(data: bytes) -> None:
        for key, mode in ((None, "RGB"), (1, "RGB"), (2, "L")):
            rng = None if key is None else transforms.sample_rng(0, 0, key)
            try:
                out = transforms.decode_crop(data, "fuzz.jpg", 16, mode, rng=rng)
            except ImageError as exc:
                assert str(exc).startswith("fuzz.jpg: ")
                continue
            assert out.shape == (16, 16, 3 if mode == "RGB" else 1) and out.dtype == np.uint8

    run(examples, inputs(valid), check)


# ---------------------------------------------------------------- YAML config

config_keys = st.sampled_from(list(TrainConfig.__dataclass_fields__) + ["lr ", "epoch", "", "model_arg"])


@st.composite
def config_documents(draw):
    values = draw(st.dictionaries(config_keys | st.integers() | st.booleans(), plain_values, max_size=6))
    return yaml.safe_dump(values).encode()


@pytest.mark.parametrize("examples", EXAMPLES)
def test_yaml_config_under_fuzzing(examples, tmp_path):
    valid = [
        b"model: resnet20\nepochs: 3\nlr: 0.1\nmodel_args: {num_classes: 10}\n",
        b"dataset: cifar10\nmilestones: [1, 2]\nschedule: multistep\n",
    ]
    path = tmp_path / "fuzz.yaml"

    def check(data: bytes) -> None:
        path.write_bytes(data)
        with peak_rss_growth_at_most(allowed_growth(len(data))):
            try:
                load_config(path).validate()
            except ConfigError as exc:  # and nothing else may come out of a config
                assert str(exc)

    run(examples, inputs(valid, config_documents()) | st.text(max_size=300).map(str.encode), check)


# ---------------------------------------------------------------- weights sidecar


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sidecar")
    model = create_model("cnn", spec="c4,p,f8", in_channels=1, num_classes=3, input_size=8)
    meta = {
        "model": "cnn",
        "model_args": {"spec": "c4,p,f8", "in_channels": 1, "num_classes": 3, "input_size": [8, 8]},
        "classes": ["a", "b", "c"],
        "mean": [0.5],
        "std": [0.25],
        "input_shape": [1, 8, 8],
    }
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
            target[key] = draw(plain_values | st.integers(-(2**40), 2**40))
    return json.dumps(meta, default=repr).encode()


@pytest.mark.parametrize("examples", EXAMPLES)
def test_weights_sidecar_under_fuzzing(examples, weights_file):
    weights, meta = weights_file
    sidecar = weights.with_suffix(".json")
    good = json.dumps(meta).encode()

    def check(data: bytes) -> None:
        sidecar.write_bytes(data)
        with peak_rss_growth_at_most(allowed_growth(len(data))):
            try:
                loaded = load_weights(weights)
            except CheckpointError as exc:
                assert "model." in str(exc)
                return
        assert len(loaded.classes) == 3 and sum(p.numel() for p in loaded.model.parameters()) > 0

    # found by the slow suite: an older sidecar's 'resize' below the input size (the Preprocess refused it raw)
    small_resize = json.dumps({**meta, "resize": 1}).encode()
    try:
        run(examples, inputs([good], damaged_sidecars(meta)), check, regressions=(small_resize,))
    finally:
        sidecar.write_bytes(good)


# ---------------------------------------------------------------- the known bombs, each in a forked child


def write_gzip_bomb(path: Path, header: bytes, mib: int) -> None:
    """A valid gzip file of `header` then `mib` MiB of zeros, written in 1 MiB steps (1 GiB in about 1 MB):
    one compressed MiB of zeros ends in a full flush, so nothing refers back across it and the same bytes
    serve for every MiB."""
    compressor, zeros = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS), bytes(MiB)
    crc = zlib.crc32(header)
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip member header: deflate, no name, no mtime
        f.write(compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH))
        block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
        for _ in range(mib):
            f.write(block)
            crc = zlib.crc32(zeros, crc)
        f.write(compressor.flush())  # the final, empty block
        f.write(struct.pack("<II", crc, (len(header) + mib * MiB) & 0xFFFFFFFF))


class _LyingArray:
    """Pickles as numpy's array reconstructor called with a shape of 2^60 bytes."""

    def __reduce__(self):
        core = getattr(np, "_core", None) or np.core
        return core.multiarray._reconstruct, (np.ndarray, (2**30, 2**30), b"b")


class _DirectArray:
    """Pickles as a direct call of numpy.ndarray with a shape of 2^40 bytes."""

    def __reduce__(self):
        return np.ndarray, ((2**20, 2**20), "u1")


_SIDECAR = {
    "model": "cnn",
    "model_args": {"spec": "c4,p,f8", "in_channels": 1, "num_classes": 3, "input_size": [8, 8]},
    "classes": ["a", "b", "c"],
    "mean": [0.5],
    "std": [0.25],
    "input_shape": [1, 8, 8],
}
_BOMB_IDX_HEADER = struct.pack(">IIII", 0x803, 10**7, 28, 28)  # 10 million 28x28 images: 7.8 GB


def write_bombs(folder: Path) -> None:
    """Each bomb, and a valid file of each kind to warm the parser up (imports, first-use caches) before the
    measured call."""
    (folder / "huge.idx").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 10**6, 10**3, 10**3) + b"\0" * 100)
    (folder / "valid.idx").write_bytes(idx_bytes(np.zeros((2, 28, 28))))
    (folder / "short_batch").write_bytes(b"\x80\x02B" + struct.pack("<I", 200_000_000) + b"only a few bytes follow")
    (folder / "direct_batch").write_bytes(pickle.dumps({"data": _DirectArray(), "labels": []}, protocol=2))
    (folder / "lying_batch").write_bytes(pickle.dumps({"data": _LyingArray(), "labels": []}, protocol=2))
    (folder / "valid_batch").write_bytes(cifar_python_batch(2)[0])
    (folder / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    (folder / "valid.png").write_bytes(_encoded("PNG"))
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10^9 leaves
    (folder / "bomb.yaml").write_text("\n".join(lines))
    (folder / "valid.yaml").write_text("model: resnet20\nepochs: 3\n")
    model = create_model("cnn", spec="c4,p,f8", in_channels=1, num_classes=3, input_size=8)
    for name, meta in (
        ("valid-sidecar", _SIDECAR),
        ("sidecar", {**_SIDECAR, "model_args": {**_SIDECAR["model_args"], "num_classes": 10**9}}),
    ):
        (folder / name).mkdir()
        save_weights(model, folder / name / "model.safetensors", meta)
    for name, spec in (("spec-sidecar", "c8x100000000,g"), ("wide-spec-sidecar", "c65536x300,g")):
        (folder / name).mkdir()
        save_weights(
            model,
            folder / name / "model.safetensors",
            {**_SIDECAR, "model_args": {**_SIDECAR["model_args"], "spec": spec}},
        )
    write_image_bombs(folder)
    write_shard_bombs(folder)
    mnist = folder / "gzip-bomb" / "mnist"
    mnist.mkdir(parents=True)
    write_gzip_bomb(mnist / "train-images-idx3-ubyte.gz", _BOMB_IDX_HEADER, 1024)
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (mnist / (name + ".gz")).write_bytes(gzip.compress(b""))


def write_image_bombs(folder: Path) -> None:
    """Images that once took seconds or gigabytes (issue 21), and a valid JPEG to warm the decoders up."""
    (folder / "valid.jpg").write_bytes(small_jpeg(0, 64))
    (folder / "scan_bomb.jpg").write_bytes(scan_bomb(8000, 8000, 2001))  # 22 KB; 22 s in one decode unchecked
    (folder / "tall.jpg").write_bytes(scan_bomb(4095, 65500, 6))  # 0.9 GB of coefficients for a 5x5 box
    with open(folder / "huge.jpg", "wb") as f:  # a sparse file: 1 GiB to read, nothing on disk
        f.write(small_jpeg())
        f.truncate(1 << 30)
    with open(folder / "junk.jpg", "wb") as f:  # JPEG's start bytes, then 32 MiB of zeros (sparse)
        f.write(b"\xff\xd8")
        f.truncate(32 << 20)
    wide = np.zeros((4096, 4096), np.uint16)
    wide[::7, ::3] = 40000
    Image.fromarray(wide).save(folder / "wide16.png")  # 16-bit greyscale, 16 MP: once 26 bytes per pixel


def write_shard_bombs(folder: Path) -> None:
    write_shards(folder / "valid-shards", [sample(f"{i:08d}_v", str(i % 3), small_jpeg(i)) for i in range(4)])
    write_shards(
        folder / "cls-bomb",
        [
            tar_member("00000000_x.cls", b"1", 4 << 30)  # a sparse 4 GiB label
            + tar_member("00000000_x.jpg", small_jpeg())
        ],
    )
    write_shards(
        folder / "image-bomb",
        [
            tar_member(f"{i:08d}_x.cls", b"1")  # 16 sparse 250 MiB images
            + tar_member(f"{i:08d}_x.jpg", small_jpeg(i), 250 << 20)
            for i in range(16)
        ],
    )
    # 16 images of 24 MiB each (a JPEG, then a hole): under the image cap, so the shuffle buffer holds them
    write_shards(
        folder / "buffer-bomb",
        [tar_member(f"{i:08d}_x.cls", b"1") + tar_member(f"{i:08d}_x.jpg", small_jpeg(i), 24 << 20) for i in range(16)],
    )
    write_shards(
        folder / "label-bomb", [sample(f"{i:08d}_x", "999" if i == 1 else "0", small_jpeg(i)) for i in range(2)]
    )
    write_shards(
        folder / "classes-bomb", [sample("00000000_x", "0", small_jpeg())], classes=[f"{i}" for i in range(2_000_000)]
    )


def _crop_file(path: Path):
    """The streaming path: region decoder, simplejpeg or Pillow, as decode_crop picks."""
    return transforms.decode_crop(path.read_bytes(), path.name, 32, "L", rng=transforms.sample_rng(0, 0, 0))


def _eval_crop_file(path: Path):
    return transforms.decode_crop(path.read_bytes(), path.name, 32, "L")


def _region_direct(path: Path):
    """The C entry point called directly, with its own defaults: a 5x5 box."""
    if transforms._jpeg_region is None:
        raise ValueError("JPEG: the _jpeg_region extension is not built here")
    return transforms._jpeg_region.decode_region(path.read_bytes(), 1, 0, 0, 5, 5, True)


def _predict_one(path: Path):
    return load_image(path, (3, 32, 32))


def _train_epoch(folder: Path):
    """One epoch over a shard folder, batches of 1, as training reads it."""
    loader = ShardLoader(open_shards(folder), "train", 1, image_size=8, mean=[0] * 3, std=[1] * 3)
    return sum(1 for _ in loader)


def _read_idx(path: Path):
    return parse_idx(read_bytes(path), path)


def _read_cifar_python(path: Path):
    return parse_cifar_python(read_bytes(path), path, "labels")


def _read_gzipped_idx(path: Path):
    return parse_idx(read_bytes(path, implied_size=lambda head: idx_length(head, path)), path)


def _load_mnist_from(folder: Path):
    return load_dataset("mnist", folder)


# name: (file in the bomb folder, how cnnlab opens it, its warm-up file, the error, its message)
BOMBS = {
    "idx-header-claiming-1e12-items": (
        "huge.idx",
        _read_idx,
        "valid.idx",
        DatasetError,
        r"huge\.idx: size 116 bytes but its header \[1000000, 1000, 1000\] implies",
    ),
    "pickle-opcode-claiming-200MB": (
        "short_batch",
        _read_cifar_python,
        "valid_batch",
        DatasetError,
        r"short_batch: not a readable CIFAR python batch",
    ),
    "pickle-calling-ndarray": (
        "direct_batch",
        _read_cifar_python,
        "valid_batch",
        DatasetError,
        r"direct_batch: refused: calling numpy\.ndarray directly",
    ),
    "pickled-array-of-2^60-bytes": (
        "lying_batch",
        _read_cifar_python,
        "valid_batch",
        DatasetError,
        r"lying_batch: .*cannot come from",
    ),
    "png-claiming-1e10-pixels": (
        "bomb.png",
        open_image,
        "valid.png",
        ImageError,
        rf"bomb\.png: .*pixels.*{MAX_IMAGE_PIXELS:,}: shrink it first",
    ),
    "sidecar-claiming-1e9-classes": (
        "sidecar/model.safetensors",
        load_weights,
        "valid-sidecar/model.safetensors",
        CheckpointError,
        r"describes a 'cnn' with .*do not belong together",
    ),
    "yaml-alias-bomb": ("bomb.yaml", load_config, "valid.yaml", ConfigError, r"bomb\.yaml: not valid YAML.*aliases"),
    "gzip-bomb-as-mnist": (
        "gzip-bomb",
        _load_mnist_from,
        "gzip-bomb",
        DatasetError,
        r"train-images-idx3-ubyte\.gz: its header claims 7,840,000,016 bytes of content, but "
        r"this file has 47,040,016",
    ),
    "gzip-bomb-read-alone": (
        "gzip-bomb/mnist/train-images-idx3-ubyte.gz",
        _read_gzipped_idx,
        "valid.idx",
        DatasetError,
        r"its header claims 7,840,000,016 bytes of content, but [\d,]+ gzip "
        r"bytes can hold at most",
    ),
    # issue 21: each decode path refuses a progressive JPEG of 2,001 scans claiming 8000x8000 pixels
    "jpeg-of-2001-scans-streamed": (
        "scan_bomb.jpg",
        _crop_file,
        "valid.jpg",
        ImageError,
        r"^scan_bomb\.jpg: a JPEG of more than 64 scans .*raise CNNLAB_MAX_JPEG_SCANS$",
    ),
    "jpeg-of-2001-scans-opened": (
        "scan_bomb.jpg",
        open_image,
        "valid.jpg",
        ImageError,
        r"scan_bomb\.jpg: a JPEG of more than 64 scans",
    ),
    "jpeg-of-2001-scans-to-the-c-decoder": (
        "scan_bomb.jpg",
        _region_direct,
        "valid.jpg",
        ValueError,
        r"^JPEG: more than 64 scans \(SOS markers\)$",
    ),
    "jpeg-claiming-4095x65500-to-the-c-decoder": (
        "tall.jpg",
        _region_direct,
        "valid.jpg",
        ValueError,
        r"^JPEG: claims 4095x65500 pixels, more than 67108864$",
    ),
    "1GiB-file-named-jpg-to-predict": (
        "huge.jpg",
        _predict_one,
        "valid.jpg",
        ImageError,
        r"huge\.jpg: 1,073,741,824 bytes, more than an image file may have "
        r"\(67,108,864\); shrink it, or raise CNNLAB_MAX_IMAGE_BYTES$",
    ),
    "jpeg-start-bytes-then-32MiB-of-junk": (
        "junk.jpg",
        open_image,
        "valid.jpg",
        ImageError,
        r"junk\.jpg: more than 65,536 bytes of junk where a JPEG marker belongs",
    ),
    "jpeg-start-bytes-then-junk-streamed": (
        "junk.jpg",
        _crop_file,
        "valid.jpg",
        ImageError,
        r"junk\.jpg: more than 65,536 bytes of junk where a JPEG marker belongs",
    ),
    "16-bit-png-of-16MP-opened": ("wide16.png", open_image, "valid.png", None, ""),
    "16-bit-png-of-16MP-streamed": ("wide16.png", _eval_crop_file, "valid.png", None, ""),
    "sidecar-with-a-spec-of-1e8-layers": (
        "spec-sidecar/model.safetensors",
        load_weights,
        "valid-sidecar/model.safetensors",
        CheckpointError,
        r"model spec 'c8x100000000,g' has 100,000,001 layers, more than cnnlab "
        r"builds \(1,000\); raise CNNLAB_MAX_MODEL_LAYERS if you mean it",
    ),
    "sidecar-with-a-spec-of-1e13-weights": (
        "wide-spec-sidecar/model.safetensors",
        load_weights,
        "valid-sidecar/model.safetensors",
        CheckpointError,
        r"holds [\d,]+ weights but its sidecar model\.json describes a 'cnn' with "
        r"11,5\d\d,\d{3},\d{3},\d{3}; the two files do not belong together",
    ),
    "shard-with-a-4GiB-sparse-cls-member": (
        "cls-bomb",
        _train_epoch,
        "valid-shards",
        DatasetError,
        r"00000000_x\.cls: a \.cls member of 4,294,967,296 bytes, more than a "
        r"class index takes \(32\)",
    ),
    "shard-with-16-sparse-250MiB-images": (
        "image-bomb",
        _train_epoch,
        "valid-shards",
        DatasetError,
        r"larger than an image file may be \(67,108,864 bytes\), not read",
    ),
    "shard-with-16-images-of-24MiB": ("buffer-bomb", _train_epoch, "valid-shards", None, ""),
    "shard-with-label-999": (
        "label-bomb",
        _train_epoch,
        "valid-shards",
        DatasetError,
        r"00000001_x\.cls: label 999 is not one of the manifest's 3 classes \(0 to 2\)",
    ),
    "shard-manifest-of-2e6-classes": (
        "classes-bomb",
        open_shards,
        "valid-shards",
        DatasetError,
        r"manifest\.json: more than 16,777,216 bytes, far more than a manifest takes",
    ),
}
# Peak RSS growth allowed where the bytes on disk say little: a correct result's own pixels, or a budget.
MP16 = 4096 * 4096
BOMB_GROWTH = {
    # open_image: Pillow's 16-bit image (2 bytes a pixel) and the 8-bit copy (1), no wider intermediate
    "16-bit-png-of-16MP-opened": 3 * MP16 + 16 * MiB,
    # decode_crop's evaluation path: the same, plus its resize of the 8-bit image (about 5 bytes a pixel, as for
    # an 8-bit file); int64 intermediates took 26 bytes a pixel
    "16-bit-png-of-16MP-streamed": 8 * MP16 + 16 * MiB,
    # the shuffle buffer's byte budget (CNNLAB_SHUFFLE_BUFFER_BYTES=32MiB in the measuring process) and the few
    # samples in flight; without the budget the 16 samples (384 MiB) were all held
    "shard-with-16-images-of-24MiB": 32 * MiB + 4 * 24 * MiB + 16 * MiB,
    # the file read whole (a sparse 32 MiB, within the image size cap), and the walk over its markers stops
    # after 64 KiB of junk: Pillow alone stepped through it a byte at a time
    "jpeg-start-bytes-then-32MiB-of-junk": 32 * MiB + SLACK,
    "jpeg-start-bytes-then-junk-streamed": 32 * MiB + SLACK,
}


def _bomb_size(path: Path) -> int:
    """The bytes an attacker hands over: the file, or the largest file of a dataset folder or a sidecar pair;
    for a sparse file, the bytes it takes on disk."""

    def size(p: Path) -> int:
        st = p.stat()
        return min(st.st_size, st.st_blocks * 512)

    if path.is_dir():
        return max(size(p) for p in path.rglob("*") if p.is_file())
    if path.suffix == ".safetensors":
        return size(path.with_suffix(".json"))
    return size(path)


def _refuse_in_fork(name: str, folder: Path) -> dict:
    """Open one bomb in a forked child (a bomb not refused harms nothing after it) and report how it ended, its
    CPU time and its peak RSS growth. The child first opens the valid file of the same kind once more, since
    torch rebuilds its thread pool after a fork (5-8 MiB on its first op, not the bomb's); its peak RSS then
    starts over (clear_refs; without it, a forked child's peak starts at its RSS at the fork)."""
    file, opener, warm_up, _, _ = BOMBS[name]
    sys.stdout.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest or the caller
        try:
            os.close(read_end)
            with contextlib.suppress(Exception):
                opener(folder / warm_up)
            _reset_peak_rss()
            start = _status_kib("VmHWM")
            # a bomb that is not refused must not take the shared machine down with it
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            cap = _status_kib("VmSize") * 1024 + (2 << 30)
            resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                with within(10 * CPU_SECONDS):
                    opener(folder / file)
                error, message = "nothing: accepted", ""
            except BaseException as exc:  # noqa: B036 - whatever ends it is the result
                error, message = type(exc).__name__, str(exc)
            result = {
                "error": error,
                "message": message,
                "cpu_s": time.process_time() - cpu,
                "wall_s": time.perf_counter() - wall,
                "growth": (_status_kib("VmHWM") - start) * 1024,
                "size": _bomb_size(folder / file),
            }
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        reply = f.read()
    os.waitpid(pid, 0)
    return json.loads(reply) if reply else {"error": "the child died", "message": "", "cpu_s": 0, "growth": 0}


def measure_bombs(folder: str) -> None:
    """Entry point of the measuring process: warm every parser up on a valid file, then one fork per bomb."""
    folder = Path(folder)
    for _name, (_, opener, warm_up, _, _) in BOMBS.items():
        with contextlib.suppress(Exception):
            opener(folder / warm_up)
    print(json.dumps({name: _refuse_in_fork(name, folder) for name in BOMBS}))


@pytest.fixture(scope="module")
def bomb_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bombs")
    write_bombs(folder)
    return folder


@pytest.fixture(scope="module")
def bomb_outcomes(bomb_folder) -> dict:
    if not Path("/proc/self/status").exists():
        pytest.skip("peak RSS is read from /proc (Linux)")
    env = {**os.environ, "CNNLAB_CACHE": str(bomb_folder / "cache"), "CNNLAB_SHUFFLE_BUFFER_BYTES": "32MiB"}
    env.pop("CNNLAB_DATA", None)
    for variable in ENVIRONMENT.values():  # the defaults, except the shuffle budget above
        if variable != "CNNLAB_SHUFFLE_BUFFER_BYTES":
            env.pop(variable, None)
    code = "import sys; sys.path.insert(0, sys.argv[1]); import test_fuzz; test_fuzz.measure_bombs(sys.argv[2])"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(bomb_folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_known_bomb_is_refused_fast_and_small(name, bomb_outcomes):
    """Refused (or, where a correct result exists, decoded) in under a second of CPU and 2 s of wall time, its
    peak RSS, read in the child process that opened it, within a few MB of the file's size (or BOMB_GROWTH)."""
    _, _, _, error, message = BOMBS[name]
    got = bomb_outcomes[name]
    print(
        f"{name}: {got['error']} after {got['cpu_s'] * 1e3:.1f} ms CPU ({got['wall_s'] * 1e3:.1f} ms wall), "
        f"peak RSS +{got['growth'] / MiB:.2f} MiB, for a file of {got['size']:,} bytes"
    )
    if "_jpeg_region extension is not built" in got["message"]:
        pytest.skip("the _jpeg_region extension is not built here")
    if error is None:
        assert got["error"] == "nothing: accepted", got
    else:
        assert got["error"] == error.__name__ and re.search(message, got["message"]), got
    assert got["growth"] <= BOMB_GROWTH.get(name, allowed_growth(got["size"], SLACK)), got
    assert got["cpu_s"] <= CPU_SECONDS and got["wall_s"] <= WALL_SECONDS, got


@pytest.mark.slow
def test_the_gzip_bomb_is_a_gigabyte_of_zeros_behind_an_mnist_header(bomb_folder):
    """What the bomb tests refuse is real: a naive gunzip of it yields 1 GiB (checked in 1 MiB pieces)."""
    total = 0
    with gzip.open(bomb_folder / "gzip-bomb" / "mnist" / "train-images-idx3-ubyte.gz") as f:
        assert f.read(16) == _BOMB_IDX_HEADER
        while piece := f.read(MiB):
            assert not any(piece[::4096]) and piece.count(0) == len(piece)
            total += len(piece)
    assert total == 1 << 30


def test_the_time_bound_counts_cpu_time_not_wall_time():
    """A shared machine stretches wall time (here: a sleep, as when the process waits for a core); only work
    done counts, so a busy loop past the budget is stopped and the waiting is not."""
    with within(0.1):
        time.sleep(0.3)
    with pytest.raises(TookTooLong, match="0.1 s of CPU time"), within(0.1):
        while True:
            pass


# ---------------------------------------------------------------- the JPEG decoders as a target of their own

import fuzz_jpeg  # noqa: E402 - tests/fuzz_jpeg.py, also `make fuzz`'s JPEG target

# What `make fuzz` found, replayed in every run: each file's name is the run's seed and the input's index.
JPEG_REGRESSIONS = sorted((Path(__file__).parent / "fuzz_regressions").glob("*.jpg"))


@pytest.mark.parametrize("inputs", [pytest.param(60, id="60"), pytest.param(600, id="600", marks=pytest.mark.slow)])
def test_every_jpeg_decode_path_under_fuzzing(inputs, tmp_path):
    """Mutated seeds of every kind (tests/fuzz_jpeg.py) through the region decoder with hostile boxes, decode_crop
    on each decoder, and open_image, in child processes: no crash, only each path's own error, within a second."""
    report = fuzz_jpeg.fuzz(0, inputs, 60 if inputs <= 60 else 200, tmp_path / "findings", log=lambda text: None)
    assert report["inputs tried"] == inputs and report["crashes"] == 0 and report["findings"] == [], report
    assert report["slowest decode call"]["cpu_s"] <= fuzz_jpeg.CPU_SECONDS


@pytest.mark.parametrize("path", JPEG_REGRESSIONS, ids=lambda p: p.stem)
def test_what_jpeg_fuzzing_found_is_decoded_or_refused_in_bounded_time(path, tmp_path):
    seed, index = (int(v) for v in path.stem.removeprefix("seed").split("-"))
    slowest = fuzz_jpeg.check_one(path.read_bytes(), np.random.default_rng([seed, index, 1]), tmp_path)
    assert slowest <= fuzz_jpeg.CPU_SECONDS


def test_a_crash_in_a_fuzz_batch_is_caught_and_its_input_named(tmp_path, monkeypatch):
    monkeypatch.setenv("FUZZ_JPEG_CRASH_AT", "5")  # the child aborts (SIGABRT) on input 5, as a crash would
    report = fuzz_jpeg.fuzz(7, 6, 6, tmp_path, log=lambda text: None)
    assert report["inputs tried"] == 6 and report["crashes"] == 1
    assert [f["index"] for f in report["findings"]] == [5]
    assert "crashed the process (exit -6)" in report["findings"][0]["problem"]
    data, _ = fuzz_jpeg.make_input(7, 5, fuzz_jpeg.seeds())
    assert (tmp_path / "seed7-5.jpg").read_bytes() == data
