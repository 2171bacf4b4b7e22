"""Image folders for the streaming tests: JPEG and PNG of mixed sizes and modes, and broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def textured(width: int, height: int, seed: int) -> np.ndarray:
    """An RGB picture with structure at several scales, so that crops and resizes differ visibly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 9 + seed) * 70, np.cos(y / 7) * 70, ((x + y) % 64) * 2.0], axis=-1) + 128
    return (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=92, **kwargs)
    return buffer.getvalue()


def rotated_jpeg(upright: np.ndarray) -> bytes:
    """A JPEG stored sideways with EXIF Orientation 6: a viewer rotates it 90 degrees clockwise to `upright`."""
    stored = np.rot90(upright, k=1)  # 90 degrees counter-clockwise: what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(np.ascontiguousarray(stored), exif=exif.tobytes())


def write_mixed_folder(root: Path, bad: bool = True) -> dict[str, Path]:
    """ROOT/train|test/<a|b>/ with RGB JPEGs of several sizes, a CMYK JPEG, an EXIF-rotated JPEG, a palette PNG
    with a transparent index, a 16-bit greyscale PNG, an RGBA PNG and (with `bad`) a corrupt and a truncated
    JPEG. Returns the notable files by name."""
    files: dict[str, Path] = {}
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
    sizes = [(120, 90), (90, 120), (100, 100), (160, 96), (64, 80), (200, 150)]
    for i, (w, h) in enumerate(sizes * 2):
        cls = "ab"[i % 2]
        (root / "train" / cls / f"rgb{i:02d}.jpg").write_bytes(jpeg_bytes(textured(w, h, i)))
    for i, (w, h) in enumerate(sizes[:4]):
        (root / "test" / "ab"[i % 2] / f"t{i}.jpg").write_bytes(jpeg_bytes(textured(w, h, 100 + i)))

    files["cmyk"] = root / "train" / "a" / "cmyk.jpg"
    Image.fromarray(textured(96, 72, 50)).convert("CMYK").save(files["cmyk"], "JPEG", quality=95)

    upright = np.zeros((80, 60, 3), np.uint8)  # tall: red top half, blue bottom half
    upright[:40, :, 0] = 255
    upright[40:, :, 2] = 255
    files["rotated"] = root / "train" / "b" / "rotated.jpg"
    files["rotated"].write_bytes(rotated_jpeg(upright))

    palette = Image.new("P", (64, 48), 0)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.paste(1, (0, 0, 32, 48))  # left half colour 1 (red), right half index 0 (transparent, black)
    palette.info["transparency"] = 0
    files["palette"] = root / "train" / "a" / "palette.png"
    palette.save(files["palette"], transparency=0)

    gray16 = np.full((50, 70), 0x8000, np.uint16)
    gray16[:, :35] = 0xFF00
    files["gray16"] = root / "train" / "b" / "gray16.png"
    Image.fromarray(gray16).save(files["gray16"])

    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 1] = 180
    rgba[:, :20, 3] = 255
    files["rgba"] = root / "test" / "a" / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(files["rgba"])

    if bad:
        files["corrupt"] = root / "train" / "a" / "corrupt.jpg"
        files["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 this is not image data" * 20)
        files["truncated"] = root / "train" / "b" / "truncated.jpg"
        files["truncated"].write_bytes(jpeg_bytes(textured(150, 100, 77))[:600])
    return files


def write_numbered_folder(root: Path, n_train: int, n_test: int, size: int = 24, classes: int = 3) -> Path:
    """Solid-colour PNGs whose colour encodes the sample number (red = i % 256, green = i // 256): any crop
    and resize keeps the colour, so a test can tell which sample each image of a batch is."""
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            pixels = np.zeros((size, size, 3), np.uint8)
            pixels[..., 0], pixels[..., 1], pixels[..., 2] = i % 256, i // 256, 7
            Image.fromarray(pixels).save(d / f"{i:05d}.png")
    return root


def sample_numbers(x) -> list[int]:
    """Recover the sample numbers of a batch from write_numbered_folder (loaded with mean 0, std 1)."""
    pixels = (x[:, :, 0, 0] * 255).round().long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()
