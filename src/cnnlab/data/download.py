"""Downloads: streamed to a temporary file, verified, then renamed; archives extracted safely."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from ..files import atomic_file

__all__ = ["download", "extract_archive", "digest"]

_CHUNK = 1 << 20


def digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_one(url: str, dest: Path, md5: str, timeout: float) -> None:
    """Stream `url` into a temp file next to `dest`, check length and md5, then rename into place."""
    with atomic_file(dest, suffix=".part") as tmp:
        h = hashlib.md5()
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            got = 0
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                h.update(chunk)
                got += len(chunk)
            if expected is not None and got != int(expected):
                raise DatasetError(f"truncated transfer: {got} of {expected} bytes")
        if h.hexdigest() != md5:
            raise DatasetError(f"md5 {h.hexdigest()} expected {md5}")


def download(
    filename: str,
    mirrors: tuple[str, ...] | list[str],
    dest_dir: Path,
    md5: str,
    *,
    log: Callable[[str], None] = print,
    timeout: float = 60.0,
) -> Path:
    """Download `filename` from the first mirror that delivers the right bytes; one line per failed mirror."""
    dest_dir = Path(dest_dir)
    dest = dest_dir / filename
    if dest.exists() and digest(dest, "md5") == md5:
        return dest
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=dest_dir, prefix=".write-test-")
        probe.close()
    except OSError as exc:
        raise DatasetError(
            f"cannot write to {dest_dir} ({exc.strerror}); set CNNLAB_CACHE or --data-dir to a writable folder"
        ) from None
    # The callers hold the dataset's lock, so a partial file here was left by a download that was killed.
    for partial in dest_dir.glob(f".{filename}.*.part"):
        partial.unlink(missing_ok=True)
        log(f"removed {partial.name}, a partial download cut short earlier; starting {filename} again")
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + filename
        try:
            log(f"downloading {url}")
            _fetch_one(url, dest, md5, timeout)
            return dest
        except (urllib.error.URLError, OSError, DatasetError, ValueError) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                reason: object = f"HTTP {exc.code} {exc.reason}"
            else:
                reason = getattr(exc, "reason", None) or exc
            if isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:  # ENOSPC
                raise DatasetError(
                    f"no space left in {dest_dir} while downloading {filename}; "
                    "free some space or set CNNLAB_CACHE elsewhere"
                ) from None
            failures.append(url)
            log(f"  failed: {url}: {reason}")
    raise DatasetError(
        f"could not download {filename}: all {len(failures)} mirror(s) failed "
        f"({', '.join(failures)}); check your connection, or place the file in {dest_dir} yourself"
    )


def _check_member(member: tarfile.TarInfo, target: Path) -> None:
    name = member.name
    resolved = (target / name).resolve()
    if os.path.isabs(name) or ".." in Path(name).parts or not resolved.is_relative_to(target):
        raise DatasetError(f"archive member {name!r} would land outside {target}; refusing the archive")
    if member.issym() or member.islnk():
        link_target = (
            (resolved.parent / member.linkname).resolve() if member.issym() else (target / member.linkname).resolve()
        )
        if os.path.isabs(member.linkname) or not link_target.is_relative_to(target):
            raise DatasetError(
                f"archive member {name!r} links to {member.linkname!r} outside {target}; refusing the archive"
            )
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise DatasetError(f"archive member {name!r} is a device or fifo; refusing the archive")


def extract_archive(archive: Path, target: Path, folder: str) -> Path:
    """Extract `archive` (tar, optionally compressed) so that `target/folder` appears complete or not at all.

    Every member is checked first: none may be absolute, contain `..`, or link outside `target`.
    """
    target = Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=target))
    try:
        try:
            with tarfile.open(archive) as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(member, staging)
                # the stdlib's own "data" filter, where this Python has it (3.10.12+), as a second line of defence
                extra: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(staging, members=members, **extra)
        except (tarfile.TarError, EOFError) as exc:
            raise DatasetError(f"{archive}: not a readable archive ({exc}); delete it and fetch again") from None
        except OSError as exc:  # a full or read-only cache; the staging folder is removed below
            raise DatasetError(
                f"cannot extract {archive.name} into {target} ({exc.strerror}); free some space or "
                "set CNNLAB_CACHE to another folder"
            ) from None
        if not (staging / folder).is_dir():
            raise DatasetError(f"{archive}: holds no folder {folder!r}; delete it and fetch again")
        final = target / folder
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / folder, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)
