"""Parsers for the published file formats: IDX (MNIST family) and both CIFAR layouts.

Every parser checks sizes against the header before allocating, and raises `DatasetError`
naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import pickletools
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import DatasetError

__all__ = [
    "read_bytes",
    "idx_length",
    "parse_idx",
    "parse_cifar_binary",
    "parse_cifar_python",
    "RestrictedUnpickler",
    "ForbiddenGlobal",
]

# Decompressing more than this from one file means the file is not what it claims (a gzip bomb); callers
# that know the file (the catalog's sizes, a header) pass a tighter bound.
_MAX_DECOMPRESSED = 512 << 20
# Deflate expands at most 1032:1 (a 258-byte match coded in 2 bits; zlib's FAQ), so a gzip file of n bytes
# holds at most 1032 n bytes: a header claiming more is refused before anything is decompressed.
_DEFLATE_MAX_RATIO = 1032
_CHUNK = 1 << 20  # decompressed bytes per step
_HEAD = 64  # enough decompressed bytes for any header a caller checks (IDX: at most 20)


def read_bytes(
    path: Path,
    size: int | None = None,
    *,
    implied_size: Callable[[bytes], int] | None = None,
    limit: int = _MAX_DECOMPRESSED,
    digest=None,
) -> bytes:
    """The file's content, gunzipped if it is gzip (by its magic bytes, not its name).

    `size` is the exact length a known file's content has; `implied_size(head)` returns the length its
    first bytes (a header) claim. Both are checked against what the file can hold before the body is
    decompressed, decompression stops one byte past them, and `digest` (a hashlib object) is fed the
    bytes as they lie on disk.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            on_disk = os.fstat(f.fileno()).st_size
            gz = f.read(2) == b"\x1f\x8b"
            if not gz and size is not None and on_disk != size:
                raise _wrong_size(path, on_disk, size)
            if on_disk > limit:
                raise DatasetError(f"{path}: {on_disk:,} bytes, more than {limit:,}; not a dataset file")
            f.seek(0)
            raw = f.read(limit + 1)  # bounded even if the file grows meanwhile
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) > limit:
        raise DatasetError(f"{path}: more than {limit:,} bytes; not a dataset file")
    if digest is not None:
        digest.update(raw)
    if not gz:
        if size is not None and len(raw) != size:
            raise _wrong_size(path, len(raw), size)
        return raw
    ceiling = min(limit, _DEFLATE_MAX_RATIO * len(raw))
    if size is not None and size > ceiling:
        raise DatasetError(
            f"{path}: {len(raw):,} gzip bytes cannot hold the {size:,} bytes this file has; the file "
            "is truncated or corrupt: delete it and fetch it again"
        )
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            head = stream.read(_HEAD)
            stop = size if size is not None else ceiling
            if implied_size is not None:
                claimed = implied_size(head)
                if claimed > ceiling or (size is not None and claimed != size):
                    expected = (
                        f"this file has {size:,}"
                        if size is not None
                        else f"{len(raw):,} gzip bytes can hold at most {ceiling:,}"
                    )
                    raise DatasetError(
                        f"{path}: its header claims {claimed:,} bytes of content, but {expected}; "
                        "the file is corrupt: delete it and fetch it again"
                    )
                stop = claimed
            chunks, produced = [head], len(head)
            while produced <= stop and len(chunks[-1]):  # one byte past `stop` tells a longer stream
                chunks.append(stream.read(min(_CHUNK, stop + 1 - produced)))
                produced += len(chunks[-1])
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt or truncated gzip data ({exc}); delete it and fetch it again") from None
    if produced > stop:
        if size is None and implied_size is None:
            raise DatasetError(f"{path}: decompresses to more than {stop:,} bytes; not a dataset file")
        raise DatasetError(
            f"{path}: decompresses to more than the {stop:,} bytes it should hold; the file is "
            "corrupt: delete it and fetch it again"
        )
    data = b"".join(chunks)
    if size is not None and len(data) != size:
        raise _wrong_size(path, len(data), size)
    return data


def _wrong_size(path: Path, got: int, want: int) -> DatasetError:
    return DatasetError(
        f"{path}: {got:,} bytes (decompressed), expected {want:,}; the file is truncated or "
        "corrupt: delete it and fetch it again"
    )


def _idx_header(data: bytes, path: Path | str) -> tuple[int, list[int]]:
    """Header length and dimensions of an IDX file of unsigned bytes (magic 0x0000 08 nd)."""
    if len(data) < 4:
        raise DatasetError(f"{path}: {len(data)} bytes, too short for an IDX header")
    zero, dtype, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 4:
        raise DatasetError(
            f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()}, "
            "expected 000008 followed by 1-4 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    # An empty dimension makes the product 0 whatever the others claim (2^31 say), so the size check would
    # pass and numpy would refuse the shape; no dataset file is empty.
    if 0 in dims:
        raise DatasetError(
            f"{path}: its header {dims} has a dimension of 0; an IDX dataset file is never empty: the file is corrupt"
        )
    return header, dims


def idx_length(head: bytes, path: Path | str) -> int:
    """Total length in bytes of the IDX file whose first bytes are `head`, from its header alone."""
    header, dims = _idx_header(head, path)
    return header + math.prod(dims)  # exact integer: a lying header cannot overflow


def parse_idx(data: bytes, path: Path | str) -> np.ndarray:
    """Decode an IDX file of unsigned bytes (magic 0x0000 08 nd), as used by MNIST and Fashion-MNIST."""
    header, dims = _idx_header(data, path)
    expected = header + math.prod(dims)
    if len(data) != expected:  # with no dimension 0, each dimension is then at most the file's size
        raise DatasetError(
            f"{path}: size {len(data)} bytes but its header {dims} implies {expected}; "
            "the file is truncated or corrupt: delete it and fetch it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def parse_cifar_binary(data: bytes, path: Path | str, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of `label_bytes` label bytes then 3x32x32 pixel bytes; returns (N,3,32,32) and the last label."""
    record = label_bytes + 3 * 32 * 32
    if len(data) == 0 or len(data) % record:
        raise DatasetError(
            f"{path}: size {len(data)} bytes is not a whole number of {record}-byte CIFAR records; "
            "the file is truncated or corrupt: delete it and fetch it again"
        )
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
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
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
        if (
            not all(isinstance(d, int) and d >= 0 for d in dims)
            or math.prod(dims) * self._dtype(dtype).itemsize > self.size_limit
        ):
            raise pickle.UnpicklingError(f"an array of shape {dims} cannot come from {self.size_limit} bytes")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return core.multiarray._reconstruct(np.ndarray, shape, dtype)


def _check_opcodes(data: bytes) -> None:
    """Walk the pickle's opcodes without building anything. pickletools reads each length-prefixed
    argument and fails when fewer bytes remain than claimed, whereas the C unpickler would first
    allocate the claimed length (a 5-byte header can claim 4 GiB). Memo slots are checked too: the C
    unpickler grows its memo table to the largest index stored, so a 10-byte pickle storing at index
    175,399,797 costs 1.4 GB and 2 s of CPU; a pickler numbers its slots 0, 1, 2... in order."""
    stored = 0
    for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if not isinstance(arg, int) or not 0 <= arg <= stored:
                raise pickle.UnpicklingError(f"memo index {arg} out of order (after {stored} stored values)")
            stored = max(stored, arg + 1)
        elif opcode.name == "MEMOIZE":
            stored += 1


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
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise DatasetError(f"{path}: 'data' is not an (N, 3072) uint8 array")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{path}: {label_key!r} is not a list of integers") from None
    if labels.shape != (images.shape[0],):
        raise DatasetError(f"{path}: {images.shape[0]} images but {labels.size} labels under {label_key!r}")
    return images.reshape(-1, 3, 32, 32), labels
