"""Parsers for the published file formats: IDX (MNIST family) and both CIFAR layouts.

Every parser checks sizes against the header before allocating, and raises `DatasetError`
naming the file and what is wrong.
"""
from __future__ import annotations

import gzip
import io
import math
import pickle
import pickletools
import warnings
import zlib
from pathlib import Path

import numpy as np

from ..errors import DatasetError

__all__ = ["read_bytes", "parse_idx", "parse_cifar_binary", "parse_cifar_python", "RestrictedUnpickler",
           "ForbiddenGlobal"]

# Decompressing more than this from one file means the file is not what it claims (a gzip bomb).
_MAX_DECOMPRESSED = 512 << 20


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped if it is gzip (by its magic bytes, not its name)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            data = f.read(_MAX_DECOMPRESSED + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt or truncated gzip data ({exc}); delete it and fetch it again") from None
    if len(data) > _MAX_DECOMPRESSED:
        raise DatasetError(f"{path}: decompresses to more than {_MAX_DECOMPRESSED >> 20} MiB; not a dataset file")
    return data


def parse_idx(data: bytes, path: Path | str) -> np.ndarray:
    """Decode an IDX file of unsigned bytes (magic 0x0000 08 nd), as used by MNIST and Fashion-MNIST."""
    if len(data) < 4:
        raise DatasetError(f"{path}: {len(data)} bytes, too short for an IDX header")
    zero, dtype, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 4:
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()}, "
                           "expected 000008 followed by 1-4 dimensions)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims, dtype=object))  # exact integer: a lying header cannot overflow
    if len(data) != expected:
        raise DatasetError(f"{path}: size {len(data)} bytes but its header {dims} implies {expected}; "
                           "the file is truncated or corrupt: delete it and fetch it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def parse_cifar_binary(data: bytes, path: Path | str, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of `label_bytes` label bytes then 3x32x32 pixel bytes; returns (N,3,32,32) and the last label."""
    record = label_bytes + 3 * 32 * 32
    if len(data) == 0 or len(data) % record:
        raise DatasetError(f"{path}: size {len(data)} bytes is not a whole number of {record}-byte CIFAR records; "
                           "the file is truncated or corrupt: delete it and fetch it again")
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    # CIFAR-100's binary records hold the coarse label, then the fine one; we train on the fine labels.
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), rows[:, label_bytes - 1].astype(np.int64)


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allowed set: it could run code, so it is refused."""


class _NdarrayToken:
    """Stands for numpy.ndarray inside a pickle. numpy pickles name the class only to pass it to
    `_reconstruct`; handing out the real class would let a pickle call `ndarray(shape)` directly and
    allocate whatever shape it claims."""

    def __new__(cls, *args, **kwargs):
        raise ForbiddenGlobal("calling numpy.ndarray directly is not allowed in a CIFAR batch")


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's python batches contain: dicts, lists, strings, numbers and numpy arrays.

    Arrays are checked as they are built: no object dtype (it could hold anything) and no shape
    larger than the pickle itself, so a lying shape allocates nothing.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def __init__(self, file, *, size_limit: int, **kwargs):
        super().__init__(file, **kwargs)
        self.size_limit = size_limit

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise ForbiddenGlobal(f"global '{module}.{name}' is not allowed in a CIFAR batch")
        if module == "_codecs":
            import _codecs
            return _codecs.encode
        if module.endswith("multiarray"):
            return self._reconstruct
        if name == "dtype":
            return self._dtype
        return _NdarrayToken  # only good as _reconstruct's first argument: calling it builds nothing

    @staticmethod
    def _dtype(*args):
        with warnings.catch_warnings():  # numpy 2 deprecates old aliases such as 'a': noise here
            warnings.simplefilter("ignore", DeprecationWarning)
            dtype = np.dtype(*args)
        if dtype.hasobject:
            raise ForbiddenGlobal(f"arrays of Python objects ({dtype}) are not allowed in a CIFAR batch")
        return dtype

    def _reconstruct(self, subtype, shape, dtype):
        core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
        if subtype is not _NdarrayToken:
            raise ForbiddenGlobal(f"array subclass {subtype!r} is not allowed in a CIFAR batch")
        dims = shape if isinstance(shape, tuple) else (shape,)
        if not all(isinstance(d, int) and d >= 0 for d in dims) or \
                math.prod(dims) * self._dtype(dtype).itemsize > self.size_limit:
            raise pickle.UnpicklingError(f"an array of shape {dims} cannot come from {self.size_limit} bytes")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return core.multiarray._reconstruct(np.ndarray, shape, dtype)


def _check_opcodes(data: bytes) -> None:
    """Walk the pickle's opcodes without building anything. pickletools reads each length-prefixed
    argument and fails when fewer bytes remain than claimed, whereas the C unpickler would first
    allocate the claimed length (a 5-byte header can claim 4 GiB)."""
    for _ in pickletools.genops(io.BytesIO(data)):
        pass


def _unpickle(data: bytes, path: Path | str) -> dict:
    try:
        _check_opcodes(data)
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1", size_limit=len(data)).load()
    except ForbiddenGlobal as exc:
        raise DatasetError(f"{path}: refused: {exc}; this is not a genuine CIFAR python batch") from None
    except Exception as exc:  # malformed pickle streams raise many types
        raise DatasetError(f"{path}: not a readable CIFAR python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: holds a {type(obj).__name__}, expected a dict of 'data' and labels")
    return obj


def parse_cifar_python(data: bytes, path: Path | str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR python batch: {'data': (N, 3072) uint8, label_key: [N ints]} -> (N,3,32,32), (N,)."""
    obj = _unpickle(data, path)
    images, labels = obj.get("data"), obj.get(label_key)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 \
            or images.shape[1] != 3072:
        raise DatasetError(f"{path}: 'data' is not an (N, 3072) uint8 array")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{path}: {label_key!r} is not a list of integers") from None
    if labels.shape != (images.shape[0],):
        raise DatasetError(f"{path}: {images.shape[0]} images but {labels.size} labels under {label_key!r}")
    return images.reshape(-1, 3, 32, 32), labels
