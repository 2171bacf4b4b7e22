"""ImageNet-style per-image transforms: RandomResizedCrop + flip for training, resize + centre crop for evaluation,
decoded cheaply and converted to one colour mode.

Decoding takes the cheapest exact route that applies (bench/stream.py times each):
1. a training crop of a JPEG: only the crop's region is decoded (`_jpeg_region`, a small C extension over the
   system's libjpeg-turbo, built at install when a compiler and libjpeg's headers are there), to the pixels of a
   full decode;
2. any other RGB or greyscale JPEG: a whole decode by libjpeg-turbo (that extension, else `simplejpeg`);
3. everything else: Pillow.
A JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT (Pillow's draft mode) when the crop keeps at least
size x size pixels at that scale.

Resizing is torch's antialiased bilinear kernel on uint8 (what torchvision's Resize and RandomResizedCrop run on
uint8 tensors): about 3.5x faster than Pillow's resize here, and within 2 levels of it.

Every random draw comes from a generator keyed by (seed, epoch, sample index), so a sample's crop does not
depend on which worker decodes it or on what was decoded before: a resumed run replays it exactly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ImageError
from .images import WIDE_GRAY_MODES, limits, open_encoded, to_8bit

try:  # region-of-interest JPEG decoding (setup.py builds it; optional)
    # a C extension that mypy sees only where it was built
    from . import _jpeg_region  # type: ignore[attr-defined,unused-ignore]
except ImportError:
    _jpeg_region = None
try:  # libjpeg-turbo bindings: whole JPEGs to the same pixels as Pillow's decoder, about a fifth sooner
    import simplejpeg as _simplejpeg
except ImportError:
    _simplejpeg = None

__all__ = [
    "GRAY_MODES",
    "EVAL_CROP_FRACTION",
    "sample_rng",
    "random_resized_crop_box",
    "eval_resize",
    "eval_pixels",
    "to_model_mode",
    "resize",
    "decode_crop",
    "ImageTransform",
]

# Modes a greyscale file opens in; a dataset whose images are all in one of these trains on 1 channel.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")
# Evaluation resizes the shorter side to size / 0.875 (256 for 224) and crops the centre: the ResNet recipe.
EVAL_CROP_FRACTION = 0.875


def sample_rng(seed: int, epoch: int, index: int, salt: int = 0) -> np.random.Generator:
    """The generator of one sample's draws: a pure function of its key, never of worker or call order."""
    return np.random.default_rng([seed, epoch, index, salt])


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: 10 tries at an area in `scale` and a log-uniform aspect
    ratio in `ratio`, else a centre crop clamped to `ratio`. Returns the box (left, top, right, bottom)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def eval_resize(width: int, height: int, short_target: int, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """Resize(short_target) + CenterCrop(crop) with torchvision's rounding: the resized (width, height) and the
    crop's (left, top) in it."""
    crop_h, crop_w = crop
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(short_target * long / short)
    new_w, new_h = (short_target, new_long) if width <= height else (new_long, short_target)
    return new_w, new_h, int(round((new_w - crop_w) / 2.0)), int(round((new_h - crop_h) / 2.0))


def to_model_mode(im: Image.Image, mode: str) -> Image.Image:
    """Convert any decoded image to "RGB" or "L" the same way in training and evaluation.

    Transparent pixels (RGBA, LA, palette with a transparent index) are composited over white rather than
    showing whatever colour the file stored under them; 16-bit greyscale keeps its top 8 bits (Pillow's own
    conversion clips everything above 255 to white).
    """
    if im.mode == mode:
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in WIDE_GRAY_MODES:  # 16-bit values to 8-bit, a band of rows at a time
        im = Image.fromarray(to_8bit(im))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    if im.mode not in ("RGB", "L", "1"):  # CMYK, YCbCr, LAB, HSV, RGBA: through RGB, which Pillow converts all
        im = im.convert("RGB")
    return im.convert(mode) if im.mode != mode else im


# EXIF Orientation -> the transpose that shows the image upright (the EXIF 2.3 table, as ImageOps uses it)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _jpeg_pixels(data: bytes, scale: int, box: tuple[int, int, int, int], gray: bool) -> np.ndarray:
    """The box (coordinates at 1/scale) of a JPEG, decoded by _jpeg_region: (h, w, C) uint8, contiguous."""
    left, top, right, bottom = box
    lim = limits()
    pixels = _jpeg_region.decode_region(
        data, scale, left, top, right, bottom, gray, max_pixels=lim.image_pixels, max_scans=lim.jpeg_scans
    )
    return np.frombuffer(pixels, np.uint8).reshape(bottom - top, right - left, 1 if gray else 3)


def _decode_whole(im: Image.Image, data: bytes, scale: int, orientation: int, mode: str) -> np.ndarray:
    """The whole image upright in `mode`, a JPEG at 1/`scale` in the DCT: (h, w, C) uint8. libjpeg-turbo (ours,
    else simplejpeg) decodes RGB and greyscale JPEGs to exactly Pillow's pixels; anything else goes to Pillow."""
    w, h = im.size
    pixels = None
    if im.format == "JPEG" and im.mode in ("RGB", "L"):
        if _jpeg_region is not None:
            pixels = _jpeg_pixels(data, scale, (0, 0, -(-w // scale), -(-h // scale)), im.mode == "L")
        elif _simplejpeg is not None:
            pixels = _simplejpeg.decode_jpeg(
                data, colorspace="RGB" if im.mode == "RGB" else "GRAY", min_width=w // scale, min_height=h // scale
            )
            if pixels.shape[:2] != (-(-h // scale), -(-w // scale)):  # libjpeg-turbo's k/8 factors can differ
                pixels = None
    if pixels is not None:
        if orientation not in _UPRIGHT and im.mode == mode:
            return pixels
        im = Image.fromarray(pixels if im.mode == "RGB" else pixels[:, :, 0])
    else:
        if scale > 1:
            im.draft(None, (w // scale, h // scale))
        im.load()
    if im.mode in WIDE_GRAY_MODES and mode == "L" and orientation not in _UPRIGHT:
        return to_8bit(im)[:, :, None]  # already a fresh array: no second copy of a 64 MP image
    im = to_model_mode(im, mode)  # per pixel, so before the transpose: that then copies the narrower image
    if orientation in _UPRIGHT:
        im = im.transpose(_UPRIGHT[orientation])
    pixels = np.array(im)  # a copy torch may share: np.asarray's view is read-only
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _scaled_box(box, sx: float, sy: float, width: int, height: int) -> tuple[int, int, int, int]:
    """A box of the full-size image in an image decoded at (sx, sy) of its size: whole pixels, never empty."""
    left = min(int(round(box[0] * sx)), width - 1)
    top = min(int(round(box[1] * sy)), height - 1)
    right = min(max(int(round(box[2] * sx)), left + 1), width)
    return left, top, right, min(max(int(round(box[3] * sy)), top + 1), height)


def _decode_box(
    im: Image.Image, data: bytes, scale: int, box: tuple[int, int, int, int], orientation: int, mode: str
) -> np.ndarray:
    """The pixels of a training crop `box` (upright, full-size coordinates), decoded at 1/`scale`. An upright
    JPEG in `mode` has only the crop's region decoded; one that does not end with its EOI marker is decoded
    whole, so that a truncated file fails whatever the crop (decoding stops below the region)."""
    width, height = (im.size[1], im.size[0]) if orientation in (5, 6, 7, 8) else im.size
    if (
        _jpeg_region is not None
        and im.format == "JPEG"
        and im.mode == mode
        and orientation not in _UPRIGHT
        and bytes(data[-2:]) == b"\xff\xd9"
    ):
        w, h = -(-width // scale), -(-height // scale)
        return _jpeg_pixels(data, scale, _scaled_box(box, w / width, h / height, w, h), mode == "L")
    pixels = _decode_whole(im, data, scale, orientation, mode)
    h, w = pixels.shape[:2]
    left, top, right, bottom = _scaled_box(box, w / width, h / height, w, h)
    return pixels[top:bottom, left:right]


def resize(pixels: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(h, w, C) uint8 to a (C, height, width) uint8 tensor: bilinear, antialiased when shrinking, by torch's uint8
    kernel (the one torchvision's Resize runs on uint8 tensors; within 2 levels of Pillow's BILINEAR)."""
    x = torch.from_numpy(pixels).permute(2, 0, 1)
    if pixels.shape[:2] == (height, width):
        return x
    x = x.unsqueeze(0).contiguous(memory_format=torch.channels_last)  # its vectorised path reads 3-4 channels
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))  # EXIF Orientation
    except Exception:  # a malformed EXIF block is ignored, as viewers do
        return 1


def _decode_guarded(data: bytes, name: str, work):
    """Run `work(im)` on the opened image with every decoder failure turned into an ImageError naming `name`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return work(open_encoded(data, name))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: too many pixels ({exc}); cnnlab opens at most {limits().image_pixels:,}") from None
    except MemoryError:
        raise ImageError(f"{name}: too large to decode") from None
    except Exception as exc:  # decoders raise many types on malformed data (OSError, SyntaxError, struct.error...)
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise ImageError(f"{name}: not a readable image ({type(exc).__name__}: {reason})") from None


def _upright_size(im: Image.Image) -> tuple[int, int, int]:
    """(width, height) as shown after EXIF rotation, and the orientation."""
    orientation = _orientation(im)
    width, height = im.size
    return (height, width, orientation) if orientation in (5, 6, 7, 8) else (width, height, orientation)


def _draft_scale(im: Image.Image, reduction: float, draft: bool) -> int:
    """The JPEG DCT scale (1, 2, 4 or 8) that still leaves at least the pixels the resize needs."""
    if not draft or im.format != "JPEG":
        return 1
    return next((s for s in (8, 4, 2) if s <= reduction), 1)


def eval_pixels(
    data: bytes,
    name: str,
    size: tuple[int, int],
    mode: str,
    rule: str = "shorter",
    resize_to: int | None = None,
    *,
    draft: bool = True,
) -> np.ndarray:
    """The evaluation input (C, H, W) uint8 of an encoded image: EXIF orientation applied, converted to `mode`,
    then `rule` "squash" (whole image to H x W) or "shorter" (shorter side to `resize_to`, torchvision's
    rounding, then the centre H x W). The only place cnnlab resizes a file for evaluation or prediction."""
    h, w = size

    def work(im: Image.Image) -> np.ndarray:
        width, height, orientation = _upright_size(im)
        if rule == "squash":
            scale = _draft_scale(im, min(width / w, height / h), draft)
            return resize(_decode_whole(im, data, scale, orientation, mode), h, w).contiguous().numpy()
        assert resize_to is not None  # the "shorter" rule comes with its length (Preprocess checks it)
        new_w, new_h, left, top = eval_resize(width, height, resize_to, (h, w))
        scale = _draft_scale(im, min(width, height) / resize_to, draft)
        pixels = resize(_decode_whole(im, data, scale, orientation, mode), new_h, new_w)
        return pixels[:, top : top + h, left : left + w].contiguous().numpy()

    return _decode_guarded(data, name, work)


def decode_crop(
    data: bytes,
    name: str,
    size: int,
    mode: str,
    *,
    rng: np.random.Generator | None = None,
    draft: bool = True,
    channels_first: bool = False,
) -> np.ndarray:
    """Decode an encoded image to (size, size, C) uint8, or (C, size, size) with `channels_first` (the layout
    streamed batches travel in: torch's resize writes it, and no transpose is needed on either side): a
    RandomResizedCrop + flip drawn from `rng`, or the evaluation centre crop (`eval_pixels`) when `rng` is None.
    EXIF orientation is applied before the crop is chosen.

    With `draft`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT when the crop still holds at least
    size x size pixels at that scale. Any failure is an ImageError naming `name`.
    """
    if rng is None:
        pixels = eval_pixels(data, name, (size, size), mode, "shorter", round(size / EVAL_CROP_FRACTION), draft=draft)
        return pixels if channels_first else np.ascontiguousarray(pixels.transpose(1, 2, 0))

    def work(im: Image.Image) -> np.ndarray:
        width, height, orientation = _upright_size(im)  # a sideways image: the crop is chosen upright
        flip = rng.random() < 0.5
        box = random_resized_crop_box(width, height, rng)
        scale = _draft_scale(im, min(box[2] - box[0], box[3] - box[1]) / size, draft)
        # torchvision crops, then resizes: the filter sees no pixels outside the box
        pixels = resize(_decode_box(im, data, scale, box, orientation, mode), size, size)
        if flip:
            pixels = pixels.flip(-1)
        return (pixels if channels_first else pixels.permute(1, 2, 0)).contiguous().numpy()

    return _decode_guarded(data, name, work)


@dataclass(frozen=True)
class ImageTransform:
    """What a loader applies to each sample: a training crop (keyed by seed, epoch, index) or the eval crop."""

    size: int
    mode: str = "RGB"  # "RGB" or "L"
    train: bool = True
    seed: int = 0
    draft: bool = True

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"image size must be >= 1, got {self.size}")
        if self.mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L', got {self.mode!r}")

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def __call__(
        self, data: bytes, name: str, epoch: int, index: int, salt: int = 0, channels_first: bool = True
    ) -> np.ndarray:
        """(C, size, size) uint8, or (size, size, C) without `channels_first` (for channels_last batches: the
        layout the resize writes, so no transpose at all)."""
        rng = sample_rng(self.seed, epoch, index, salt) if self.train else None
        return decode_crop(data, name, self.size, self.mode, rng=rng, draft=self.draft, channels_first=channels_first)
