"""Hostile files for the limit tests (tests/test_fuzz.py's bombs, tests/test_shards.py): JPEG scan bombs, tar
members that are sparse files, and shards whose manifest matches whatever they hold."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def scan_bomb(width: int, height: int, scans: int) -> bytes:
    """A progressive greyscale JPEG claiming width x height pixels, its last scan repeated up to `scans` scans:
    about 11 bytes per scan, each one a pass over the whole image for a decoder (11 ms at 8000x8000)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    sof, sos, eoi = data.find(b"\xff\xc2"), data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    head = data[: sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[sof + 9 : sos]
    return head + data[sos:eoi] * (scans - data.count(b"\xff\xda") + 1) + b"\xff\xd9"


def small_jpeg(seed: int = 0, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def tar_member(name: str, data: bytes = b"", sparse_size: int | None = None) -> bytes:
    """One tar member holding `data`; with `sparse_size`, a GNU sparse file of that many bytes whose first
    len(data) bytes are `data` and the rest a hole: what `tar --sparse` stores for a file of zeros, a header
    and the data, whatever size the header claims."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    if sparse_size is None:
        return info.tobuf(tarfile.GNU_FORMAT) + _pad(data)
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:398] = b"%011o\0" % 0  # the one data region: at offset 0 ...
    header[398:410] = b"%011o\0" % len(data)  # ... of len(data) bytes
    header[483:495] = b"%011o\0" % sparse_size  # the file's size
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header) + _pad(data)


def sample(key: str, label: bytes | str, image: bytes, ext: str = "jpg") -> bytes:
    """A sample's two members, KEY.cls then KEY.<ext>, as cnnlab packs them."""
    label = label.encode() if isinstance(label, str) else label
    return tar_member(f"{key}.cls", label) + tar_member(f"{key}.{ext}", image)


def write_shards(
    folder: Path, train: list[bytes], classes: list[str] | None = None, mode: str = "RGB", **manifest
) -> Path:
    """FOLDER/train-000000.tar of the given samples (each from `sample`, or members of one), a one-sample test
    shard, and a manifest that matches them byte for byte: what someone could hand us."""
    folder.mkdir(parents=True, exist_ok=True)
    classes = classes or ["a", "b", "c"]
    splits = {}
    for split, samples in (("train", train), ("test", [sample("00000000_t", "0", small_jpeg(1))])):
        data = b"".join(samples) + b"\0" * 1024
        name = f"{split}-000000.tar"
        (folder / name).write_bytes(data)
        splits[split] = {
            "samples": len(samples),
            "order": "sorted by path",
            "shards": [
                {"name": name, "samples": len(samples), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            ],
        }
    meta = {
        "format": "cnnlab-shards",
        "version": 1,
        "source": "hostile",
        "classes": classes,
        "mode": mode,
        "counts": {s: v["samples"] for s, v in splits.items()},
        "splits": splits,
        **manifest,
    }
    (folder / "manifest.json").write_text(json.dumps(meta))
    return folder
