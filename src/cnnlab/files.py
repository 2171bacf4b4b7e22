"""Files that are complete or absent, and locks between processes: the one place `data`, `engine` and `viz`
write results from.

A result is written to a temporary file in the same folder, flushed and fsynced, then renamed over its
name, so a reader (or a run killed mid-write) sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["save_atomic", "write_durably", "fsync_dir", "file_lock", "readable_mode"]

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
            f.write(view[offset:offset + _CHUNK])
            if offset == 0 and on_first_chunk is not None:
                on_first_chunk()
        f.flush()
        os.fsync(f.fileno())


def save_atomic(data: bytes, path: str | Path) -> Path:
    """Write `data` to a temp file in the same folder, fsync it, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, readable_mode())  # mkstemp makes files private (0600); results should be as readable as any file
        write_durably(fd, data)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


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
