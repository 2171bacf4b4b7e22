"""Find, verify, decode and cache the named datasets as uint8 tensors (N, C, H, W).

Look-up order: `data_dir`, `$CNNLAB_DATA`, the user cache, well-known system folders; a download
into the cache happens only when asked for (`download=True` or `cnnlab data fetch`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import platformdirs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import DatasetError
from ..files import atomic_file, file_lock
from .catalog import DataFile, DatasetSpec, get_spec
from .dataset import Dataset
from .download import download, extract_archive
from .formats import idx_length, parse_cifar_binary, parse_cifar_python, parse_idx, read_bytes
from .imagefolder import decode_image_folder, image_folder_files
from .preprocess import Preprocess
from .synthetic import make_synthetic

__all__ = ["Dataset", "load_dataset", "locate", "cache_dir", "search_roots", "fetch", "channel_stats"]

_CACHE_FORMAT = 4  # bump when the decoded cache layout changes (2: sources' sha256; 3: EXIF, modes, image_size;
# 4: image folders decoded by their Preprocess, with torch's resize)
# Bytes a file may hold per image beyond its pixels: a CIFAR python batch stores labels and a file name
# (about 50 bytes); the rest is slack. Bounds the files the catalog gives no size for.
_OVERHEAD_PER_IMAGE = 256


def cache_dir() -> Path:
    """Where downloads and decoded tensors go: $CNNLAB_CACHE, else the platform's user cache folder."""
    return Path(os.environ.get("CNNLAB_CACHE") or platformdirs.user_cache_dir("cnnlab"))


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    roots = []
    if data_dir:
        roots.append(Path(data_dir))
    if os.environ.get("CNNLAB_DATA"):
        roots.append(Path(os.environ["CNNLAB_DATA"]))
    roots.append(cache_dir() / "datasets")
    return roots


def _find_file(folder: Path, f: DataFile) -> Path | None:
    for candidate in (folder / f.name, folder / (f.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def locate(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> tuple[str, Path, list[Path]]:
    """Return (layout, folder, files) of the first complete copy; raise naming every place searched."""
    if spec.format == "synthetic":
        raise DatasetError(f"{spec.name} has no files to locate: it is generated in memory by load_dataset")
    if spec.format == "imagefolder":
        if data_dir is None:
            raise DatasetError(f"imagefolder needs --data-dir ROOT; {spec.how_to_get}")
        return "imagefolder", Path(data_dir), image_folder_files(Path(data_dir))
    looked: list[str] = []
    folders: list[tuple[str, Path]] = []
    for root in search_roots(data_dir):
        for layout in spec.files:
            # <root>/<layout>/, torchvision's <root>/<Name>/raw/, and <root> itself
            for folder in (root / layout, root / layout / "raw", root):
                folders.append((layout, folder))
    for system_dir in spec.system_dirs:
        folders += [(layout, Path(system_dir)) for layout in spec.files]
    for layout, folder in folders:
        if not folder.is_dir():
            if str(folder) not in looked:
                looked.append(str(folder))
            continue
        paths = [_find_file(folder, f) for f in spec.files[layout]]
        if all(paths):
            return layout, folder, paths  # type: ignore[return-value]
        if str(folder) not in looked:
            looked.append(str(folder))
    raise DatasetError(f"dataset {spec.name!r} not found; looked in: {', '.join(looked)}. To get it: {spec.how_to_get}")


def _checksum_matches(data: bytes, want: str | None) -> bool:
    if want is None:
        return False
    algorithm, hexdigest = want.split(":", 1)
    return hashlib.new(algorithm, data).hexdigest() == hexdigest


def _decode(
    spec: DatasetSpec, layout: str, paths: list[Path]
) -> tuple[dict[str, np.ndarray], list[dict], bool, list[str]]:
    """Parse every file, checking content checksums; returns arrays, per-file records, all-verified, and the
    sha256 of each file as it lay on disk when it was read (what the cache entry is checked against)."""
    arrays: dict[str, list[np.ndarray]] = {"train_images": [], "train_labels": [], "test_images": [], "test_labels": []}
    records, all_verified, sources = [], True, []
    # No file of a dataset holds more than the whole dataset: the bound for files the catalog gives no size
    max_content = sum(spec.counts.values()) * (math.prod(spec.shape) + _OVERHEAD_PER_IMAGE) + (1 << 20)
    for f, path in zip(spec.files[layout], paths):
        source = hashlib.sha256()
        header = functools.partial(idx_length, path=path) if spec.format == "idx" else None
        data = read_bytes(path, f.size, implied_size=header, limit=max(max_content, f.size or 0), digest=source)
        sources.append(source.hexdigest())
        verified = _checksum_matches(data, f.content)
        all_verified &= verified
        records.append(
            {
                "file": str(path),
                "sha256": hashlib.sha256(data).hexdigest(),
                "status": "verified" if verified else "unverified",
            }
        )
        split = "test" if f.name.startswith(("t10k", "test")) else "train"
        if spec.format == "idx":
            array = parse_idx(data, path)
            kind = "images" if "images" in f.name else "labels"
            if kind == "images":
                if array.ndim != 3:
                    raise DatasetError(f"{path}: expected images of shape (N, H, W), got {array.shape}")
                array = array[:, None]
            arrays[f"{split}_{kind}"].append(array)
        elif layout.endswith(("bin", "binary")):
            images, labels = parse_cifar_binary(data, path, label_bytes=1 if spec.format == "cifar10" else 2)
            arrays[f"{split}_images"].append(images)
            arrays[f"{split}_labels"].append(labels)
        else:
            key = "labels" if spec.format == "cifar10" else "fine_labels"
            images, labels = parse_cifar_python(data, path, key)
            arrays[f"{split}_images"].append(images)
            arrays[f"{split}_labels"].append(labels)
    merged = {k: np.concatenate(v) for k, v in arrays.items()}
    _check_structure(spec, merged, paths[0].parent)
    return merged, records, all_verified, sources


def _check_structure(spec: DatasetSpec, arrays: dict[str, np.ndarray], folder: Path) -> None:
    """What an unverified copy must still satisfy: counts per split, image shape, label range."""
    n_classes = len(spec.classes)
    for split, expected in spec.counts.items():
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != expected or len(labels) != expected:
            raise DatasetError(
                f"{folder}: {split} split has {len(images):,} images and {len(labels):,} labels, "
                f"expected {expected:,} of each; the copy is incomplete"
            )
        if tuple(images.shape[1:]) != spec.shape:
            raise DatasetError(f"{folder}: {split} images have shape {images.shape[1:]}, expected {spec.shape}")
        if labels.min() < 0 or labels.max() >= n_classes:
            raise DatasetError(
                f"{folder}: {split} labels range over {labels.min()}..{labels.max()}, expected 0..{n_classes - 1}"
            )
        if spec.format.startswith("cifar"):  # CIFAR is exactly balanced
            counts = np.bincount(labels, minlength=n_classes)
            if not (counts == expected // n_classes).all():
                raise DatasetError(
                    f"{folder}: {split} split is not balanced ({counts.min()}..{counts.max()} images "
                    f"per class, expected {expected // n_classes}); the copy is corrupt"
                )


def _class_names(spec: DatasetSpec, folder: Path) -> list[str]:
    meta = folder / "batches.meta.txt"
    if spec.format == "cifar10" and meta.is_file():
        names = [line.strip() for line in meta.read_text(errors="replace").splitlines() if line.strip()]
        if len(names) == len(spec.classes):
            return names
    return list(spec.classes)


def _sha256_of_files(paths: list[Path]) -> list[str]:
    """sha256 of each file as it lies on disk, read in 1 MiB pieces."""
    digests, buffer = [], bytearray(1 << 20)
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                h.update(memoryview(buffer)[:n])
        digests.append(h.hexdigest())
    return digests


def _cache_key(name: str, paths: list[Path], decoding) -> str:
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return hashlib.sha256(json.dumps([_CACHE_FORMAT, name, stats, decoding]).encode()).hexdigest()[:16]


def _write_cache(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Complete or absent (files.atomic_file); a cache that cannot be written is not fatal: we decode again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"cnnlab": json.dumps(meta)})
    except (OSError, SafetensorError) as exc:  # read-only or full: decode again next time
        print(
            f"note: cannot write the dataset cache {path} ({getattr(exc, 'strerror', None) or exc}); set "
            "CNNLAB_CACHE to a writable folder with space"
        )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    log: Callable[[str], None] = print,
    write_cache: bool = True,
    image_size: int | None = None,
    preprocess: Preprocess | None = None,
) -> Dataset:
    """Find (or, when `download`, fetch), verify, decode once and cache a named dataset. With
    `write_cache=False` nothing is written (the other ranks of a distributed run write no files).
    Image folders: `image_size` resizes the shorter side to it and keeps the centre square, instead of the
    most common size; `preprocess` (a trained model's, from its sidecar) decodes exactly as training did."""
    spec = get_spec(name)
    if spec.format == "shards":
        raise DatasetError(
            "shards are streamed, never decoded into memory: train with --dataset shards "
            "--data-dir OUT (the folder 'cnnlab data pack' wrote)"
        )
    if spec.format == "synthetic":  # nothing to find or cache: generated from its recipe in about a second
        return make_synthetic(name, spec.shape, len(spec.classes), spec.counts["train"], spec.counts["test"])
    try:
        layout, folder, paths = locate(spec, data_dir)
    except DatasetError:
        if not download:
            raise
        fetch(name, log=log)
        layout, folder, paths = locate(spec, data_dir)
    # The key (path, size, mtime) picks the entry; the entry holds the sha256 of every source file as it
    # was decoded, and the files are hashed again on every read, so an edit that keeps size and mtime
    # (a restored mtime, a coarse clock) is decoded again, never served stale.
    decoding = None
    if spec.format == "imagefolder":  # the geometry decides the pixels; the normalisation does not
        decoding = preprocess.to_dict() | {"mean": [], "std": []} if preprocess else image_size
    else:
        preprocess = None
    cache_file = cache_dir() / "decoded" / f"{name}-{_cache_key(name, paths, decoding)}.safetensors"
    if cache_file.is_file():
        try:
            with safe_open(cache_file, "pt") as f:  # one open for the tensors and their metadata
                meta = json.loads(f.metadata()["cnnlab"])
                if meta["sources"] == _sha256_of_files(paths):
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
                    decoded_by = Preprocess.from_dict(meta["decoded_by"]) if meta.get("decoded_by") else None
                    return Dataset(
                        name,
                        meta["classes"],
                        tensors["train_images"],
                        tensors["train_labels"],
                        tensors["test_images"],
                        tensors["test_labels"],
                        str(folder),
                        meta["verified"],
                        meta["files"],
                        decoded_by=decoded_by,
                    )
            log(f"note: the files of {name} in {folder} changed since they were cached; decoding again")
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log(f"note: ignoring unreadable cache {cache_file} ({type(exc).__name__}); decoding again")
    if spec.format == "imagefolder":
        sources = _sha256_of_files(paths)  # before decoding: a file changed meanwhile mismatches next time
        arrays, classes, records, decoded_by = decode_image_folder(
            folder, paths, log=log, image_size=image_size, preprocess=preprocess
        )
        verified = None
    else:
        arrays, records, verified, sources = _decode(spec, layout, paths)
        classes, decoded_by = _class_names(spec, folder), None
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    for k in ("train_labels", "test_labels"):
        tensors[k] = tensors[k].to(torch.int64)
    if write_cache:
        _write_cache(
            cache_file,
            tensors,
            {
                "classes": classes,
                "verified": verified,
                "files": records,
                "sources": sources,
                "decoded_by": _geometry(decoded_by) if decoded_by else None,
            },
        )
    return Dataset(
        name,
        classes,
        tensors["train_images"],
        tensors["train_labels"],
        tensors["test_images"],
        tensors["test_labels"],
        str(folder),
        verified,
        records,
        decoded_by=decoded_by,
    )


def _geometry(preprocess: Preprocess) -> dict:
    """A preprocessing as the cache stores it: its statistics are placeholders (the run computes its own)."""
    return preprocess.with_stats([0.0] * preprocess.channels, [1.0] * preprocess.channels).to_dict()


def fetch(name: str, *, log: Callable[[str], None] = print, spec: DatasetSpec | None = None) -> Path:
    """Download a named dataset into the cache (once, even with several processes at it) and return its folder."""
    spec = spec or get_spec(name)
    if not spec.mirrors:
        raise DatasetError(f"dataset {name!r} cannot be downloaded; {spec.how_to_get}")
    root = cache_dir() / "datasets"
    lock = cache_dir() / "locks" / f"{name}.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.touch()
    except OSError as exc:
        raise DatasetError(
            f"cannot write to the cache {cache_dir()} ({exc.strerror}); set CNNLAB_CACHE to a "
            "writable folder, or place the dataset's files yourself and pass --data-dir"
        ) from None
    with file_lock(lock):
        if spec.archive is None:  # files one by one into <root>/<layout>/
            layout = next(iter(spec.files))
            for f in spec.files[layout]:
                if f.download_md5 is None:
                    raise DatasetError(f"{name}: no download checksum for {f.name}")
                download(f.name + ".gz", spec.mirrors, root / layout, f.download_md5, log=log)
            return root / layout
        final = root / spec.archive.folder
        if final.is_dir() and all(_find_file(final, f) for f in spec.files[spec.archive.folder]):
            return final
        archive = download(spec.archive.filename, spec.mirrors, root, spec.archive.md5, log=log)
        folder = extract_archive(archive, root, spec.archive.folder)
        archive.unlink()  # the extracted files are checked on every decode; the archive is no longer needed
        return folder


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], in float64 over chunks to bound memory."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()
