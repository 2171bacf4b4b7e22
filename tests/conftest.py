"""Shared fixtures: a private cache, tiny dataset files written on the fly, and a local HTTP server."""

from __future__ import annotations

import gzip
import http.server
import os
import pickle
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from PIL import Image

# Property-based tests: `make test` and CI replay one fixed seed ("ci"), so that a run passes or fails the same
# way on every machine; `make fuzz` ("fuzz") draws fresh seeds and many more examples. Neither has a wall-clock
# deadline or speed health check, which a shared machine trips: tests/test_fuzz.py bounds CPU time instead.
_NOT_WALL_CLOCK = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("ci", derandomize=True, database=None, **_NOT_WALL_CLOCK)
settings.register_profile(
    "fuzz",
    derandomize=False,
    database=None,
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "5000")),
    **_NOT_WALL_CLOCK,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Read before any fixture clears them: where this machine keeps its data.
_USER_DATA, _USER_CACHE = os.environ.get("CNNLAB_DATA"), os.environ.get("CNNLAB_CACHE")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache folder and no $CNNLAB_DATA, so nothing leaks between tests."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("CNNLAB_CACHE", str(cache))
    monkeypatch.delenv("CNNLAB_DATA", raising=False)
    return cache


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def write_idx_dataset(folder: Path, n_train: int, n_test: int, gz: bool = True, seed: int = 0) -> dict[str, bytes]:
    """Four IDX files (MNIST names) of random 28x28 images; returns the raw (decompressed) bytes by name."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    content = {
        "train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n_train, 28, 28))),
        "train-labels-idx1-ubyte": idx_bytes(np.arange(n_train) % 10),
        "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n_test, 28, 28))),
        "t10k-labels-idx1-ubyte": idx_bytes(np.arange(n_test) % 10),
    }
    for name, data in content.items():
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return content


def cifar_records(n: int, label_bytes: int = 1, seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rows = [bytes([7] * (label_bytes - 1)) + bytes([labels[i]]) + images[i].tobytes() for i in range(n)]
    return b"".join(rows), images, labels


def cifar_python_batch(n: int, seed: int = 0) -> tuple[bytes, np.ndarray, list[int]]:
    """A CIFAR-10 python batch as the publisher pickled it: a dict with a (N, 3072) uint8 array and a label list."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [i % 10 for i in range(n)]
    return pickle.dumps({"batch_label": "testing batch", "data": data, "labels": labels}, protocol=2), data, labels


def write_image_folder(root: Path, classes=("circle", "square", "stripe"), per_class=(40, 10), size=16, seed=0):
    """A learnable RGB image folder: each class is a bright pattern in its own place, plus noise."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                third = size // len(classes)
                img[:, k * third : (k + 1) * third, k % 3] = 230
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


class CodeRunningPickle:
    """Unpickling this object would create `marker`: a stand-in for a hostile file's payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "shapes")


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path.startswith("/broken/"):
            self.send_error(503, "mirror down")
            return
        data = self.files.get(self.path.split("/", 2)[-1])
        if data is None:
            self.send_error(404)
            return
        truncated = self.path.startswith("/truncated/")
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.path.startswith("/slow/"):  # eight pieces over 0.4 s, so that transfers overlap or can be cut
            step = max(len(data) // 8, 1)
            for i in range(0, len(data), step):
                self.wfile.write(data[i : i + step])
                self.wfile.flush()
                time.sleep(0.05)
            return
        self.wfile.write(data[: len(data) // 2] if truncated else data)
        if truncated:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """Serves `server.files[name]` at http://127.0.0.1:PORT/<prefix>/<name>; /broken/ answers 503,
    /truncated/ sends half of the announced bytes and /slow/ sends them in pieces over 0.4 s."""
    handler = type("Handler", (_Handler,), {"files": {}, "hits": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.base = f"http://127.0.0.1:{server.server_address[1]}"
    server.files = handler.files
    server.hits = handler.hits
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def fashion_mnist_dir() -> Path:
    """The real Fashion-MNIST where this machine has it; CI installs Debian's package, so there it must exist."""
    import platformdirs

    cache = Path(_USER_CACHE or platformdirs.user_cache_dir("cnnlab")) / "datasets" / "fashion-mnist"
    for candidate in (
        _USER_DATA and Path(_USER_DATA) / "fashion-mnist",
        _USER_DATA,
        cache,
        "/usr/share/datasets/fashion-mnist",
    ):
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").exists():
            return Path(candidate)
    if os.environ.get("CI"):
        pytest.fail("Fashion-MNIST is missing in CI: .ci/run should install Debian's dataset-fashion-mnist")
    pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def _shared_datasets_with(marker: str) -> Path:
    """The ../shared/datasets folder that holds `marker` (as --data-dir takes it); in CI a missing copy fails,
    elsewhere it skips."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here.parent / "shared" / "datasets", here / "shared" / "datasets"):
        if (candidate / marker).exists():
            return candidate
    if os.environ.get("CI"):
        pytest.fail(f"../shared/datasets/{marker} is missing in CI")
    pytest.skip(f"no shared copy of {marker} next to the checkout")


@pytest.fixture
def shared_cifar10() -> Path:
    return _shared_datasets_with("cifar-10-batches-bin/test_batch.bin")


@pytest.fixture
def shared_mnist() -> Path:
    """The folder above the shared MNIST copy (../shared/datasets/mnist), as --data-dir takes it."""
    return _shared_datasets_with("mnist/t10k-images-idx3-ubyte.gz")
