"""How an image file becomes a model's input: decided once per run, stored with the weights (model.json), and
asked by every consumer (training's evaluation, `cnnlab eval`, `predict`, the report, export), in the manner of
timm's `resolve_data_config` + `create_transform` and torchvision's classification presets.

Two resize rules cover every dataset cnnlab trains on:
- "squash": the whole image to H x W (the named datasets, whose files are already that size, and image folders
  decoded at their most common size);
- "shorter": the shorter side to `resize_to`, then the centre H x W (image folders at --image-size, where
  resize_to is the size itself, and streamed folders, where it is size / 0.875: torchvision's Resize + CenterCrop).
Pixels come from one decoder (`transforms.eval_pixels`: EXIF orientation, one colour conversion, JPEG DCT scaling
where exact enough, torch's antialiased uint8 resize), so the same file gives the same input everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch

from ..errors import ImageError
from .images import read_image_file
from .transforms import EVAL_CROP_FRACTION, eval_pixels

__all__ = ["Preprocess", "RESIZE_RULES", "normalise"]

RESIZE_RULES = ("squash", "shorter")
_MAX_SIDE = 8192


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (x / 255 - mean) / std per channel, as float32 on the images' device."""
    shape = (1, images.shape[1], 1, 1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(shape)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(shape)
    return (images.float() / 255 - mean_t) / std_t


@dataclass(frozen=True)
class Preprocess:
    """Resize rule, crop size, colour mode and normalisation of one model's input."""

    size: tuple[int, int]  # (H, W) the model takes
    channels: int  # 1: greyscale ("L"), 3: RGB
    resize: str = "squash"  # see RESIZE_RULES
    resize_to: int | None = None  # "shorter": the shorter side's length before the centre crop
    mean: tuple[float, ...] | None = None  # per channel, of pixels in [0, 1]; None until the statistics are known
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        h, w = self.size
        if not (1 <= h <= _MAX_SIDE and 1 <= w <= _MAX_SIDE):
            raise ValueError(f"preprocess size {self.size}: each side must be in 1..{_MAX_SIDE}")
        if self.channels not in (1, 3):
            raise ValueError(f"preprocess channels {self.channels}: 1 or 3")
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"resize rule {self.resize!r}: one of {', '.join(RESIZE_RULES)}")
        if self.resize == "shorter" and not (self.resize_to and max(h, w) <= self.resize_to <= _MAX_SIDE):
            raise ValueError(
                f"resize_to {self.resize_to}: the shorter side must be resized to at least the crop "
                f"{self.size} and at most {_MAX_SIDE}"
            )

    # ------------------------------------------------------------------ the rules of each kind of data
    @classmethod
    def squash(cls, channels: int, height: int, width: int) -> Preprocess:
        return cls((height, width), channels)

    @classmethod
    def centre_crop(cls, channels: int, size: int, crop_fraction: float = 1.0) -> Preprocess:
        """Shorter side to size / crop_fraction, then the centre size x size (1.0: the centre square)."""
        return cls((size, size), channels, "shorter", round(size / crop_fraction))

    @classmethod
    def imagenet_eval(cls, size: int = 224, channels: int = 3) -> Preprocess:
        """torchvision's ImageNet evaluation: shorter side to 256 (for 224), centre crop, ImageNet's statistics."""
        return replace(
            cls.centre_crop(channels, size, EVAL_CROP_FRACTION), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
        )

    def with_stats(self, mean, std) -> Preprocess:
        return replace(self, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))

    # ------------------------------------------------------------------ model.json
    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def to_dict(self) -> dict:
        return {
            "resize": self.resize,
            "resize_to": self.resize_to,
            "size": list(self.size),
            "mode": self.mode,
            "mean": list(self.mean or ()),
            "std": list(self.std or ()),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """The inverse of to_dict; a ValueError says what is wrong (the sidecar reader names the file)."""
        if not isinstance(d, dict):
            raise ValueError("'preprocess' must be an object")
        size = d.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            raise ValueError("'preprocess.size' must be [H, W]")
        if d.get("mode") not in ("L", "RGB"):
            raise ValueError("'preprocess.mode' must be 'L' or 'RGB'")
        resize_to = d.get("resize_to")
        if resize_to is not None and not _is_int(resize_to):
            raise ValueError("'preprocess.resize_to' must be a whole number")
        channels = 1 if d["mode"] == "L" else 3
        stats = []
        for key in ("mean", "std"):
            values = d.get(key)
            if not (isinstance(values, list) and len(values) == channels and all(_is_number(v) for v in values)):
                raise ValueError(f"'preprocess.{key}' must be {channels} numbers")
            stats.append(tuple(float(v) for v in values))
        if not all(v > 0 for v in stats[1]):
            raise ValueError("'preprocess.std' must be positive")
        # a missing or unknown rule is refused by __post_init__
        return cls((size[0], size[1]), channels, cast(str, d.get("resize")), resize_to, *stats)

    @classmethod
    def from_sidecar(cls, meta: dict) -> Preprocess:
        """A checked sidecar's preprocessing; sidecars written before it was recorded keep their old behaviour:
        the whole image to input_shape, or with 'resize' the shorter side to it and the centre crop."""
        if "preprocess" in meta:
            return cls.from_dict(meta["preprocess"])
        c, h, w = meta["input_shape"]
        # the old predict scaled the shorter side to `resize` but never below the crop
        rule = cls((h, w), c, "shorter", max(meta["resize"], h, w)) if meta.get("resize") else cls((h, w), c)
        return rule.with_stats(meta["mean"], meta["std"])

    def describe(self) -> str:
        h, w = self.size
        how = (
            f"whole image to {w}x{h}"
            if self.resize == "squash"
            else f"shorter side to {self.resize_to}, centre {w}x{h}"
        )
        return f"{how}, {self.mode}" + (f", mean {_fmt(self.mean)} std {_fmt(self.std)}" if self.mean else "")

    # ------------------------------------------------------------------ applying it
    def pixels(self, data: bytes, name: str) -> np.ndarray:
        """Encoded image bytes -> the model's uint8 input (C, H, W). Any failure is an ImageError naming `name`."""
        return eval_pixels(data, name, self.size, self.mode, self.resize, self.resize_to)

    def load(self, path: str | Path) -> np.ndarray:
        """An image file -> uint8 (C, H, W), the file read under the image limits (cnnlab.data.images)."""
        return self.pixels(read_image_file(path), str(path))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) from `pixels` -> the float input the model was trained on."""
        if self.mean is None or self.std is None:
            raise ImageError("this preprocessing has no mean/std yet (with_stats gives them)")
        return normalise(images, self.mean, self.std)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _MAX_SIDE


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"
