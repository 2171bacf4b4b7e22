"""Files that are complete or absent, and locks between processes: the one place `data`, `training`, `inference` and `viz`
write results from.

A result is written to a temporary file in the same folder, flushed and fsynced, then renamed over its
name, so a reader (or a run killed mid-write) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_file", "save_atomic", "write_durably", "fsync_dir", "file_lock", "readable_mode"]

_CHUNK = 1 << 20


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; silently skipped where directories cannot be opened (some filesystems)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def readable_mode() -> int:
    """The mode a plain `open()` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_durably(fd: int, data: bytes, on_first_chunk: Callable[[], None] | None = None) -> None:
    """Write all of `data` to the open file `fd` in 1 MiB chunks, then fsync; closes `fd`."""
    with os.fdopen(fd, "wb") as f:
        view = memoryview(data)
        for offset in range(0, max(len(view), 1), _CHUNK):
            f.write(view[offset : offset + _CHUNK])
            if offset == 0 and on_first_chunk is not None:
                on_first_chunk()
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(
    path: str | Path, *, suffix: str = ".tmp", before_replace: Callable[[], None] | None = None
) -> Iterator[Path]:
    """The one atomic writer: yields a temporary path in `path`'s folder, with the mode a plain `open()` gives
    (0644 under umask 022; mkstemp's own is 0600), for the caller to write. On a clean exit the file is fsynced,
    `before_replace` runs (a checkpoint rotates its predecessor there), and it is renamed over `path`. On any
    error, KeyboardInterrupt included, the temporary file is removed and `path` is untouched: a reader, or a run
    killed mid-write, sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, readable_mode())
        finally:
            os.close(fd)
        yield tmp
        os.chmod(tmp, readable_mode())  # again: a writer may have replaced the file (safetensors' save_file does)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_atomic(
    data: bytes,
    path: str | Path,
    *,
    before_replace: Callable[[], None] | None = None,
    on_first_chunk: Callable[[Path], None] | None = None,
) -> Path:
    """Write `data` to `path` through `atomic_file`: complete or absent, readable as any file.
    `on_first_chunk(temporary path)` runs once the first MiB is written (the kill tests wait for it)."""
    with atomic_file(path, before_replace=before_replace) as tmp:
        first = None if on_first_chunk is None else (lambda: on_first_chunk(tmp))
        write_durably(os.open(tmp, os.O_WRONLY), data, first)
    return Path(path)


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = True) -> Iterator[None]:
    """An exclusive lock across processes (two fetches of one dataset download it once). With wait=False,
    raises BlockingIOError at once if another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
