"""Opening files that may be hostile: every limit on what cnnlab reads is named here (`Limits`), and the guarded
opener checks a file's size before reading it and an image's header before decoding a pixel.

Each limit has a default that real data stays far below and an environment variable that raises it (read on
every call, so DataLoader workers see it too); docs/limits.md lists them and what each protects.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError, ImageError

__all__ = [
    "open_image",
    "open_encoded",
    "read_image_file",
    "check_encoded",
    "jpeg_structure",
    "JpegStructure",
    "Limits",
    "limits",
    "MAX_IMAGE_PIXELS",
    "parse_bytes",
    "to_8bit",
]

# 64 megapixels: far beyond any training or test image. A few-kilobyte PNG can claim 100,000 x 100,000 pixels;
# that is refused before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Every limit on a file someone handed us. `limits()` applies the environment's overrides."""

    # bytes of one image file (a folder's file, a tar member, a predict input), checked before it is read:
    # a 1 GB file named .jpg is refused unread. A 64 MP photo at the best JPEG quality takes about 30 MB.
    image_bytes: int = 64 * MiB
    # pixels an image may claim (checked on its header, before any pixel buffer is allocated); the decoder's
    # image then holds at most 4 bytes per pixel (Pillow keeps RGB as RGBX): 256 MiB at the cap
    image_pixels: int = MAX_IMAGE_PIXELS
    # scans of a progressive JPEG: each is a pass over the whole image, and a 22 KB file can hold 2,000
    # (22 s of decoding at 8000x8000, 11 ms per scan). libjpeg writes 10, mozjpeg up to about 20: 64 leaves room.
    jpeg_scans: int = 64
    # bytes of junk or fill where a JPEG marker belongs (before the first scan): Pillow's header parser steps
    # over them one byte at a time, minutes for a 256 MB member of junk behind a JPEG's start bytes.
    jpeg_junk_bytes: int = 64 * 1024
    # markers before a JPEG's first scan and between its scans (a real file has tens; each costs a step here)
    jpeg_markers: int = 10_000
    # a tar shard's .cls member: a class index as text
    label_bytes: int = 32
    # encoded bytes one shuffle buffer of a shard stream may hold, besides its sample count (1,000 ImageNet JPEGs
    # take about 110 MB; 16 sparse 250 MiB members once took 4.4 GB)
    shuffle_buffer_bytes: int = 128 * MiB
    # classes a shard manifest or a weights sidecar may list (ImageNet-21k has 21,841)
    classes: int = 100_000
    # layers a model's arguments may ask for (a `cnn` spec's layers, a ResNet's depth), counted before building
    model_layers: int = 1_000
    # parameters a weights sidecar may describe, counted from its arguments before any model is built
    model_parameters: int = 2_000_000_000
    # bytes of a shard manifest (JSON): one of 100,000 classes takes about 3 MB
    json_bytes: int = 16 * MiB


# The environment variable of each configurable limit (the others guard against damaged files only).
ENVIRONMENT = {
    "image_bytes": "CNNLAB_MAX_IMAGE_BYTES",
    "image_pixels": "CNNLAB_MAX_IMAGE_PIXELS",
    "jpeg_scans": "CNNLAB_MAX_JPEG_SCANS",
    "shuffle_buffer_bytes": "CNNLAB_SHUFFLE_BUFFER_BYTES",
    "classes": "CNNLAB_MAX_CLASSES",
    "model_layers": "CNNLAB_MAX_MODEL_LAYERS",
    "model_parameters": "CNNLAB_MAX_MODEL_PARAMETERS",
}
_BYTES = ("image_bytes", "shuffle_buffer_bytes")


def parse_bytes(text: str | int) -> int:
    """'256MB', '1.5GiB', '512k' or a plain number of bytes (decimal units are powers of 1000, *iB of 1024)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not match:
        raise ConfigError(f"{text!r} is not a size; write e.g. 256MB, 1.5GiB or 4000000")
    number, unit, binary = match.groups()
    power = " kmgt".index(unit or " ")
    return int(float(number) * (1024 if binary else 1000) ** power)


def limits() -> Limits:
    """The limits in force: the defaults, each raised (or lowered) by its environment variable where set."""
    changes = {}
    for name, variable in ENVIRONMENT.items():
        text = os.environ.get(variable)
        if text:
            try:
                value = parse_bytes(text) if name in _BYTES else _parse_count(text, variable)
            except ConfigError as exc:
                raise ConfigError(f"{variable}: {exc}") from None
            if value < 1:
                raise ConfigError(f"{variable}={text!r}: must be at least 1")
            changes[name] = value
    return replace(Limits(), **changes) if changes else _DEFAULTS


def _parse_count(text: str, variable: str) -> int:
    """A whole number: 100, 1_000_000 or 2e9."""
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value.is_integer():
            raise ConfigError(f"{variable}={text!r} is not a whole number") from None
        return int(value)


_DEFAULTS = Limits()


def raise_hint(name: str) -> str:
    """How to raise a limit: the environment variable, or None for limits that guard against damage only."""
    return f"raise {ENVIRONMENT[name]}" if name in ENVIRONMENT else ""


# ---------------------------------------------------------------- reading bytes


def read_image_file(path: str | Path, lim: Limits | None = None) -> bytes:
    """The bytes of an image file, refused unread when larger than the cap (a device or a growing file is
    read only up to it)."""
    lim = lim or limits()
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > lim.image_bytes:
                raise _too_large(path, size, lim)
            data = f.read(lim.image_bytes + 1)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > lim.image_bytes:
        raise _too_large(path, len(data), lim)
    return data


def _too_large(name, size: int, lim: Limits) -> ImageError:
    return ImageError(
        f"{name}: {size:,} bytes, more than an image file may have ({lim.image_bytes:,}); "
        f"shrink it, or {raise_hint('image_bytes')}"
    )


# ---------------------------------------------------------------- JPEG structure, without decoding


@dataclass(frozen=True)
class JpegStructure:
    """What a JPEG's markers say, read without decoding: the frame and the number of scans."""

    width: int
    height: int
    sampling: tuple[tuple[int, int], ...]  # (horizontal, vertical) factor of each component
    frame: int  # the SOF marker: 0xC0 baseline, 0xC1 extended, 0xC2 progressive, 0xC9/0xCA arithmetic, ...
    scans: int

    @property
    def progressive(self) -> bool:
        return self.frame in (0xC2, 0xC6, 0xCA, 0xCE)


_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01} | set(range(0xD0, 0xD8))
# A marker inside entropy-coded data: 0xFF then anything but a stuffed 0x00, a restart marker or more fill.
# Two fixed bytes, so the search is linear whatever the data (no backtracking over runs of 0xFF).
_END_OF_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_MARKER = re.compile(rb"\xff[^\x00\xff]")


def jpeg_structure(data: bytes, name: str, lim: Limits | None = None) -> JpegStructure | None:
    """Walk a JPEG's markers up to its end (None for data that does not start like a JPEG), refusing with an
    ImageError: more scans than lim.jpeg_scans, more junk between markers than lim.jpeg_junk_bytes, more
    markers than lim.jpeg_markers. The cost is one regular-expression pass over the entropy-coded bytes plus
    a step per marker. Damage that a decoder reports itself (a short file, a bad length) ends the walk."""
    lim = lim or limits()
    view = memoryview(data)
    if bytes(view[:2]) != b"\xff\xd8":
        return None
    n, pos, junk, markers, scans = len(data), 2, 0, 0, 0
    frame = None
    while pos < n:
        m = _MARKER.search(data, pos, min(n, pos + lim.jpeg_junk_bytes - junk + 2))
        if m is None:
            if n - pos > lim.jpeg_junk_bytes - junk:
                raise ImageError(
                    f"{name}: more than {lim.jpeg_junk_bytes:,} bytes of junk where a JPEG marker "
                    f"belongs (offset {pos:,}); the file is damaged: re-encode or remove it"
                )
            break
        junk += m.start() - pos
        marker, pos = data[m.start() + 1], m.end()
        markers += 1
        if markers > lim.jpeg_markers:
            raise ImageError(
                f"{name}: more than {lim.jpeg_markers:,} JPEG markers; the file is damaged or "
                "hostile: re-encode or remove it"
            )
        if marker == 0xD9:  # EOI
            break
        if marker in _STANDALONE or marker == 0xD8:
            continue
        if pos + 2 > n:
            break
        end = pos + int.from_bytes(view[pos : pos + 2], "big")
        if marker in _FRAMES and frame is None and end - pos >= 8 and pos + 8 <= n:  # a whole frame header
            count = data[pos + 7]
            factors = tuple((data[i + 1] >> 4, data[i + 1] & 15) for i in range(pos + 8, min(end, n) - 2, 3))
            frame = (
                marker,
                int.from_bytes(view[pos + 3 : pos + 5], "big"),
                int.from_bytes(view[pos + 5 : pos + 7], "big"),
                factors[:count],
            )
        pos = end
        if marker == 0xDA:  # SOS: the entropy-coded data runs to the next marker
            scans += 1
            if scans > lim.jpeg_scans:
                raise ImageError(
                    f"{name}: a JPEG of more than {lim.jpeg_scans} scans (each one a pass over the "
                    f"whole image; real files have about 10): re-encode it, or "
                    f"{raise_hint('jpeg_scans')}"
                )
            m = _END_OF_SCAN.search(data, pos)
            if m is None:
                break
            pos = m.start()
    if frame is None:
        return None
    marker, height, width, sampling = frame
    return JpegStructure(width, height, sampling, marker, scans)


def check_encoded(data: bytes, name: str, lim: Limits | None = None) -> JpegStructure | None:
    """The checks an encoded image passes before any decoder sees it: its size, and a JPEG's structure and the
    pixels its frame claims. Returns the JPEG's structure (None for other formats)."""
    lim = lim or limits()
    if len(data) > lim.image_bytes:
        raise _too_large(name, len(data), lim)
    structure = jpeg_structure(data, name, lim)
    if structure is not None:
        check_pixels(structure.width, structure.height, name, lim)
    return structure


def check_pixels(width: int, height: int, name, lim: Limits | None = None) -> None:
    lim = lim or limits()
    if width * height > lim.image_pixels:
        raise ImageError(
            f"{name}: claims {width}x{height} pixels, more than cnnlab opens ({lim.image_pixels:,}): "
            f"shrink it first, or {raise_hint('image_pixels')}"
        )


def open_encoded(data: bytes, name, lim: Limits | None = None) -> Image.Image:
    """Pillow's lazy image of `data` (nothing decoded yet) once the size, the JPEG structure and the pixels
    the header claims have passed. Pillow's own errors pass through (decode_crop and open_image name them)."""
    lim = lim or limits()
    check_encoded(data, name, lim)
    im = Image.open(io.BytesIO(data))
    check_pixels(*im.size, name, lim)
    return im


def open_image(path: str | Path) -> Image.Image:
    """Decode `path` fully and return the image; any failure is an ImageError naming the file."""
    path = Path(path)
    lim = limits()
    data = read_image_file(path, lim)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = open_encoded(data, path, lim)
            im.load()  # from memory: no file stays open, and no copy is needed to close one
            return im
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # PIL's own, larger limit
        raise ImageError(
            f"{path}: too many pixels ({exc}); cnnlab opens at most {lim.image_pixels:,}: shrink it first"
        ) from None
    except MemoryError:
        raise ImageError(f"{path}: too large to decode") from None
    except Exception as exc:  # decoders raise many types on malformed data (OSError, SyntaxError, struct.error...)
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise ImageError(f"{path}: not a readable image ({type(exc).__name__}: {reason})") from None


# ---------------------------------------------------------------- wide modes

WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_BAND_BYTES = 4 * MiB


def to_8bit(im: Image.Image) -> np.ndarray:
    """A 16- or 32-bit greyscale image as (h, w) uint8: the top 8 of 16 bits ("I" is read as 16-bit data, as
    PNG's 16-bit files open in older Pillows), "F" clipped to 0..255. Converted a band of rows at a time, so
    that nothing wider than the decoded image itself is ever held whole (int64 over 64 MP took 1.9 GB)."""
    w, h = im.size
    out = np.empty((h, w), np.uint8)
    rows = max(1, _BAND_BYTES // max(1, 4 * w))
    for y in range(0, h, rows):
        band = np.asarray(im.crop((0, y, w, min(h, y + rows))))
        out[y : y + rows] = np.clip(band if im.mode == "F" else band >> 8, 0, 255)
    return out
