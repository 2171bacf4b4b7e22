"""ImageNet-style per-image transforms in Pillow: RandomResizedCrop + flip for training, resize + centre crop
for evaluation, decoded cheaply (JPEG draft mode) and converted to one colour mode.

Every random draw comes from a generator keyed by (seed, epoch, sample index), so a sample's crop does not
depend on which worker decodes it or on what was decoded before: a resumed run replays it exactly.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import ImageError
from .images import MAX_IMAGE_PIXELS

try:  # libjpeg-turbo bindings: the same pixels as Pillow's decoder, about a fifth sooner (bench/stream.py)
    import simplejpeg as _simplejpeg
except ImportError:
    _simplejpeg = None

__all__ = ["GRAY_MODES", "EVAL_CROP_FRACTION", "sample_rng", "random_resized_crop_box", "eval_crop_box",
           "to_model_mode", "decode_crop", "ImageTransform"]

# Modes a greyscale file opens in; a dataset whose images are all in one of these trains on 1 channel.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")
# Evaluation resizes the shorter side to size / 0.875 (256 for 224) and crops the centre: the ResNet recipe.
EVAL_CROP_FRACTION = 0.875


def sample_rng(seed: int, epoch: int, index: int, salt: int = 0) -> np.random.Generator:
    """The generator of one sample's draws: a pure function of its key, never of worker or call order."""
    return np.random.default_rng([seed, epoch, index, salt])


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
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


def eval_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The region of the original image that Resize(round(size / 0.875)) + CenterCrop(size) keeps, in the
    original's pixel coordinates (torchvision's rounding), so one resize of that box does both steps."""
    short_target = round(size / EVAL_CROP_FRACTION)
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(short_target * long / short)
    new_w, new_h = (short_target, new_long) if width <= height else (new_long, short_target)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


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
    elif im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        pixels = np.asarray(im).astype(np.int64)
        im = Image.fromarray(np.clip(pixels >> 8, 0, 255).astype(np.uint8))  # 16-bit values to 8-bit
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    if im.mode not in ("RGB", "L", "1"):  # CMYK, YCbCr, LAB, HSV, RGBA: through RGB, which Pillow converts all
        im = im.convert("RGB")
    return im.convert(mode) if im.mode != mode else im


def _open(data: bytes, name: str) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    width, height = im.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name}: claims {width}x{height} pixels, more than cnnlab opens ({MAX_IMAGE_PIXELS:,}): "
                         "shrink it first")
    return im


# EXIF Orientation -> the transpose that shows the image upright (the EXIF 2.3 table, as ImageOps uses it)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _decode(im: Image.Image, data: bytes, scale: int) -> Image.Image:
    """The pixels of an opened image; a JPEG at 1/`scale` in the DCT. simplejpeg, when installed, decodes
    RGB and greyscale JPEGs to exactly Pillow's pixels (both are libjpeg-turbo); anything else goes to Pillow."""
    w, h = im.size
    if _simplejpeg is not None and im.format == "JPEG" and im.mode in ("RGB", "L"):
        pixels = _simplejpeg.decode_jpeg(data, colorspace="RGB" if im.mode == "RGB" else "GRAY",
                                         min_width=w // scale, min_height=h // scale)
        if pixels.shape[:2] == (-(-h // scale), -(-w // scale)):  # libjpeg-turbo's k/8 factors can differ
            return Image.fromarray(pixels if im.mode == "RGB" else pixels[:, :, 0])
    if scale > 1:
        im.draft(None, (w // scale, h // scale))
    im.load()
    return im


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))  # EXIF Orientation
    except Exception:  # a malformed EXIF block is ignored, as viewers do
        return 1


def decode_crop(data: bytes, name: str, size: int, mode: str, *, rng: np.random.Generator | None = None,
                draft: bool = True) -> np.ndarray:
    """Decode an encoded image to (size, size, C) uint8: a RandomResizedCrop + flip drawn from `rng`, or the
    evaluation centre crop when `rng` is None. EXIF orientation is applied before the crop is chosen.

    With `draft`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT when the crop still holds at least
    size x size pixels at that scale. Any failure is an ImageError naming `name`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = _open(data, name)
            width, height = im.size
            orientation = _orientation(im)
            if orientation in (5, 6, 7, 8):  # stored sideways: choose the crop on the upright image
                width, height = height, width
            flip = False
            if rng is not None:
                flip = rng.random() < 0.5
                box = random_resized_crop_box(width, height, rng)
            else:
                box = eval_crop_box(width, height, size)
            scale = 1
            if draft and im.format == "JPEG":
                reduction = min(box[2] - box[0], box[3] - box[1]) / size
                scale = next((s for s in (8, 4, 2) if s <= reduction), 1)
            im = _decode(im, data, scale)
            if orientation in _UPRIGHT:
                im = im.transpose(_UPRIGHT[orientation])
            im = to_model_mode(im, mode)
            if rng is not None and im.size == (width, height):
                # torchvision crops, then resizes: the filter sees no pixels outside the box (bit-exact)
                im = im.crop(box).resize((size, size), Image.BILINEAR)
            else:  # one resize of the box does resize + centre crop, or a crop of a draft-reduced image
                sx, sy = im.size[0] / width, im.size[1] / height
                im = im.resize((size, size), Image.BILINEAR, box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
            if flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            pixels = np.asarray(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: too many pixels ({exc}); cnnlab opens at most {MAX_IMAGE_PIXELS:,}") from None
    except MemoryError:
        raise ImageError(f"{name}: too large to decode") from None
    except Exception as exc:  # decoders raise many types on malformed data (OSError, SyntaxError, struct.error...)
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise ImageError(f"{name}: not a readable image ({type(exc).__name__}: {reason})") from None
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


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

    def __call__(self, data: bytes, name: str, epoch: int, index: int, salt: int = 0) -> np.ndarray:
        rng = sample_rng(self.seed, epoch, index, salt) if self.train else None
        return decode_crop(data, name, self.size, self.mode, rng=rng, draft=self.draft)
