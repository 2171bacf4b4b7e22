"""Region-of-interest JPEG decoding (the _jpeg_region extension): only a training crop's region is decoded, and
its pixels are those of a full decode, whatever the chroma subsampling, scan order, restart markers, DCT scale or
crop position; a file cut short fails whatever the crop."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import numpy as np
import pytest
from mixed_images import jpeg_bytes, textured
from PIL import Image

from cnnlab.data import transforms
from cnnlab.data.transforms import decode_crop, random_resized_crop_box, sample_rng
from cnnlab.errors import ImageError

region = transforms._jpeg_region
needs_region = pytest.mark.skipif(
    region is None,
    reason="the _jpeg_region extension is not built here (it needs "
    "a C compiler and libjpeg's headers when cnnlab is installed)",
)


def test_the_region_decoder_is_built_where_ci_runs():
    if not os.environ.get("CI"):
        pytest.skip("CI installs gcc and libjpeg-dev; elsewhere the extension is optional")
    assert region is not None, (
        "cnnlab.data._jpeg_region did not build: install gcc and libjpeg-dev, then pip install -e ."
    )


def full_decode(data: bytes, scale: int, gray: bool) -> np.ndarray:
    """Pillow's whole decode at 1/scale (draft mode), the reference."""
    im = Image.open(io.BytesIO(data))
    if scale > 1:
        im.draft(None, (im.width // scale, im.height // scale))
    pixels = np.asarray(im.convert("L" if gray else "RGB"))
    return pixels[:, :, None] if gray else pixels


FLAVOURS = {
    "4:2:0": dict(subsampling=2),
    "4:2:2": dict(subsampling=1),
    "4:4:4": dict(subsampling=0),
    "progressive 4:2:0": dict(subsampling=2, progressive=True),
    "restart markers": dict(subsampling=2, restart_marker_blocks=3),
    "grey": dict(),
    "grey progressive": dict(progressive=True),
}


@needs_region
@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("width,height", [(333, 251), (97, 61), (16, 16)])
def test_a_decoded_region_has_the_pixels_of_a_full_decode(flavour, width, height):
    gray = flavour.startswith("grey")
    pixels = textured(width, height, width)
    data = jpeg_bytes(pixels[:, :, 0] if gray else pixels, **FLAVOURS[flavour])
    rng = np.random.default_rng(width * height)
    for scale in (1, 2, 4, 8):
        full = full_decode(data, scale, gray)
        h, w = full.shape[:2]
        boxes = [random_resized_crop_box(w, h, rng) for _ in range(25)]
        boxes += [(0, 0, w, h), (w - 1, h - 1, w, h), (0, h - 1, 1, h), (w // 2, 0, w, 1)]  # edges, single pixels
        for left, top, right, bottom in boxes:
            pixels = region.decode_region(data, scale, left, top, right, bottom, gray)
            want, where = full[top:bottom, left:right], (scale, (left, top, right, bottom))
            assert len(pixels) == want.size, where
            assert np.array_equal(np.frombuffer(pixels, np.uint8).reshape(want.shape), want), where


@needs_region
def test_bad_regions_and_bad_data_are_value_errors():
    data = jpeg_bytes(textured(64, 48, 2))
    for box in [(0, 0, 65, 48), (10, 10, 10, 20), (-1, 0, 5, 5), (0, 40, 8, 30)]:
        with pytest.raises(ValueError, match=r"not inside the 64x48 image"):
            region.decode_region(data, 1, *box, False)
    with pytest.raises(ValueError, match="scale_denom must be 1, 2, 4 or 8"):
        region.decode_region(data, 3, 0, 0, 8, 8, False)
    with pytest.raises(ValueError, match="^JPEG: "):
        region.decode_region(b"\xff\xd8 not a jpeg at all", 1, 0, 0, 1, 1, False)
    with pytest.raises(ValueError, match="^JPEG: Premature end of JPEG file"):
        region.decode_region(data[: len(data) // 2], 1, 0, 0, 64, 48, False)


@needs_region
def test_a_jpeg_cut_short_fails_even_when_the_crop_lies_above_the_cut():
    data = jpeg_bytes(textured(300, 200, 3))
    cut = data[: int(len(data) * 0.9)]  # the bottom rows are missing, the top ones decode
    assert len(region.decode_region(cut, 1, 0, 0, 50, 20, False)) == 50 * 20 * 3  # the decoder stops above the cut
    for index in range(20):  # decode_crop decodes a file without its end marker whole, and fails on it
        with pytest.raises(ImageError, match=r"^cut\.jpg: not a readable image"):
            decode_crop(cut, "cut.jpg", 64, "RGB", rng=sample_rng(0, 0, index))


@needs_region
def test_trailing_bytes_after_the_end_marker_fall_back_to_a_whole_decode(monkeypatch):
    data = jpeg_bytes(textured(200, 150, 4)) + b"\0\0 camera padding"
    fast = [decode_crop(data, "x.jpg", 64, "RGB", rng=sample_rng(0, 0, i)) for i in range(5)]
    monkeypatch.setattr(transforms, "_jpeg_region", None)
    monkeypatch.setattr(transforms, "_simplejpeg", None)
    assert all(
        np.array_equal(a, decode_crop(data, "x.jpg", 64, "RGB", rng=sample_rng(0, 0, i))) for i, a in enumerate(fast)
    )


# Every chroma subsampling libjpeg-turbo writes (TurboJPEG's TJSAMP_* and cjpeg -sample), luma factors first
SUBSAMPLINGS = {
    "4:4:4": "1x1",
    "4:2:2": "2x1",
    "4:2:0": "2x2",
    "4:4:0": "1x2",
    "4:1:1": "4x1",
    "4:1:0": "4x2",
    "grey": None,
}
needs_cjpeg = pytest.mark.skipif(
    shutil.which("cjpeg") is None and not os.environ.get("CI"),
    reason="cjpeg (Debian's libjpeg-turbo-progs) writes 4:4:0, 4:1:1 and 4:1:0; Pillow cannot",
)


def cjpeg(pixels: np.ndarray, sample: str | None, *options: str) -> bytes:
    """The JPEG libjpeg-turbo's cjpeg writes for `pixels` with luma sampled `sample` (HxV), or greyscale."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PPM")
    args = ["cjpeg", "-quality", "90", *options] + (["-sample", sample] if sample else ["-grayscale"])
    return subprocess.run(args, input=buffer.getvalue(), capture_output=True, check=True).stdout


def edge_boxes(w: int, h: int) -> list[tuple[int, int, int, int]]:
    """Boxes starting at the left and top edges, one pixel in, either side of the first two iMCU boundaries (8,
    16 or 32 pixels) and in the middle, ending one pixel later or at the right and bottom edges."""
    lefts = sorted({x for x in (0, 1, 7, 15, 17, 31, 33, 47, w // 2, w - 1) if x < w})
    tops = sorted({y for y in (0, 1, 9, 17, 33, h // 2, h - 1) if y < h})
    return [(x, y, r, b) for x in lefts for y in tops for r in {x + 1, w} for b in {min(y + 5, h), h}]


@needs_region
@needs_cjpeg
@pytest.mark.parametrize("subsampling", list(SUBSAMPLINGS))
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_every_subsampling_gives_a_full_decodes_pixels_at_every_scale_and_offset(subsampling, progressive):
    """4:1:0 at 1/2 and 1/4 once differed by up to 183 levels on 30% of a box (jpeg_crop_scanline's chroma
    width); the decoder now decodes the whole width there."""
    gray = subsampling == "grey"
    for width, height in [(97, 61)] if progressive else [(333, 251), (97, 61)]:  # progressive: 3x slower
        pixels = textured(width, height, width)
        data = cjpeg(
            pixels[:, :, 0] if gray else pixels, SUBSAMPLINGS[subsampling], *(["-progressive"] if progressive else [])
        )
        for scale in (1, 2, 4, 8):
            full = full_decode(data, scale, gray)
            h, w = full.shape[:2]
            for left, top, right, bottom in edge_boxes(w, h):
                got = region.decode_region(data, scale, left, top, right, bottom, gray)
                want = full[top:bottom, left:right]
                assert np.array_equal(np.frombuffer(got, np.uint8).reshape(want.shape), want), (
                    subsampling,
                    width,
                    scale,
                    (left, top, right, bottom),
                )


@needs_region
@needs_cjpeg
@pytest.mark.parametrize("subsampling", [s for s in SUBSAMPLINGS if s != "grey"])
def test_training_crops_equal_pillows_for_every_subsampling(subsampling, monkeypatch):
    """decode_crop through the region decoder against the same crops through Pillow alone (an 800x600 4:1:0
    file differed by up to 211 levels)."""
    data = cjpeg(textured(800, 600, 9), SUBSAMPLINGS[subsampling])
    fast = [decode_crop(data, "x.jpg", 64, "RGB", rng=sample_rng(0, 0, i)) for i in range(12)]
    monkeypatch.setattr(transforms, "_jpeg_region", None)
    monkeypatch.setattr(transforms, "_simplejpeg", None)
    for i, a in enumerate(fast):
        assert np.array_equal(a, decode_crop(data, "x.jpg", 64, "RGB", rng=sample_rng(0, 0, i))), (subsampling, i)


@pytest.mark.slow
@needs_region
@needs_cjpeg
@pytest.mark.parametrize(
    "sample", ["3x1", "3x2", "1x3", "2x3", "1x4", "2x4", "2x2,2x1,1x1", "2x1,1x2,1x1", "1x1,2x2,2x2", "1x2,1x1,1x2"]
)
def test_unusual_sampling_factors_cjpeg_writes_are_exact_too(sample):
    """Beyond TurboJPEG's subsamplings: factors of 3, tall luma, and chroma sampled above 1x1."""
    data = cjpeg(textured(333, 251, 8), sample)
    for scale in (1, 2, 4, 8):
        full = full_decode(data, scale, False)
        h, w = full.shape[:2]
        for left, top, right, bottom in edge_boxes(w, h):
            got = region.decode_region(data, scale, left, top, right, bottom, False)
            want = full[top:bottom, left:right]
            assert np.array_equal(np.frombuffer(got, np.uint8).reshape(want.shape), want), (
                sample,
                scale,
                (left, top, right, bottom),
            )
