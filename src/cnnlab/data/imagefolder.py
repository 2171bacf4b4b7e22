"""Your own images as a dataset: ROOT/<split>/<class>/*.png|jpg|..., decoded once into uint8 tensors
(memory mode) or listed for per-sample decoding (stream mode, see stream.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import DatasetError, ImageError
from .images import open_encoded, read_image_file
from .preprocess import Preprocess
from .transforms import GRAY_MODES

__all__ = [
    "IMAGE_EXTENSIONS",
    "image_folder_files",
    "decode_image_folder",
    "TEST_SPLITS",
    "image_folder_classes",
    "split_of",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TEST_SPLITS = ("test", "val")


def _split_dirs(root: Path) -> tuple[Path, Path]:
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; expected ROOT/train/<class>/ and ROOT/test/<class>/")
    train = root / "train"
    test = next((root / s for s in TEST_SPLITS if (root / s).is_dir()), None)
    if not train.is_dir() or test is None:
        raise DatasetError(
            f"image folder {root} needs a 'train' and a 'test' (or 'val') sub-folder, each with one "
            f"folder per class; found: {sorted(p.name for p in root.iterdir()) or 'nothing'}"
        )
    return train, test


def image_folder_classes(root: Path) -> list[str]:
    """The class names: the sub-folders of ROOT/train, sorted (index = label)."""
    train, _ = _split_dirs(root)
    return sorted(p.name for p in train.iterdir() if p.is_dir())


def split_of(root: Path, path: Path) -> tuple[str, str]:
    """("train" or "test", class name) of a file listed by image_folder_files."""
    split, class_name = path.relative_to(root).parts[:2]
    return ("train" if split == "train" else "test"), class_name


def image_folder_files(root: Path) -> list[Path]:
    """Every file under the train and test splits, sorted; errors for empty classes and non-image files."""
    train, test = _split_dirs(root)
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{train} holds no class folders; put each class's images in {train}/<class>/")
    files, empty, strays = [], [], []
    for split in (train, test):
        for d in sorted(p for p in split.iterdir() if p.is_dir()):
            if d.name not in classes:
                raise DatasetError(f"{d}: class {d.name!r} is not among the training classes {classes}")
            members = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
            images = [p for p in members if p.suffix.lower() in IMAGE_EXTENSIONS]
            strays += [p for p in members if p.suffix.lower() not in IMAGE_EXTENSIONS]
            if not images and split == train:
                empty.append(str(d))
            files += images
    if empty:
        raise DatasetError(f"empty class folder(s): {', '.join(empty)}; add images or remove the folder(s)")
    if strays:
        shown = ", ".join(str(p) for p in strays[:5]) + (f" and {len(strays) - 5} more" if len(strays) > 5 else "")
        raise DatasetError(
            f"non-image file(s) in the image folder: {shown}; move them out "
            f"(images end in {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def _peek(path: Path) -> tuple[str, tuple[int, int]]:
    """An image's mode and its size as shown (EXIF orientations 5-8 swap width and height), from its header."""
    try:  # the guarded opener's checks (file size, JPEG structure, pixels) come first
        im = open_encoded(read_image_file(path), path)
        width, height = im.size
        swapped = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        return im.mode, ((height, width) if swapped else (width, height))
    except ImageError as exc:
        raise DatasetError(f"{exc}; remove or replace it") from None
    except Exception as exc:  # a header PIL cannot read
        raise DatasetError(f"{path}: not a readable image ({type(exc).__name__}); remove or replace it") from None


def decode_image_folder(
    root: Path,
    files: list[Path],
    log: Callable[[str], None] = print,
    image_size: int | None = None,
    preprocess: Preprocess | None = None,
) -> tuple[dict[str, np.ndarray], list[str], list[dict], Preprocess]:
    """Decode all images to one mode (L if all are greyscale, else RGB) and one size: with `image_size`, the
    shorter side resized to it and the centre square kept; without, the most common size (others resized).
    A given `preprocess` (a trained model's) decides both instead. Returns the arrays, the classes, the file
    records and the preprocessing used, which evaluation and prediction then repeat file by file."""
    classes = image_folder_classes(root)
    if preprocess is None:
        # First the headers only (mode, size as shown after EXIF rotation), so that memory never holds more than
        # one full-resolution image: a folder of 12-megapixel photos decoded at --image-size 64 stays small.
        headers = [_peek(path) for path in files]
        channels = 1 if all(im_mode in GRAY_MODES for im_mode, _ in headers) else 3
        if image_size is None:
            (w, h), _ = Counter(im_size for _, im_size in headers).most_common(1)[0]
            resized = sum(im_size != (w, h) for _, im_size in headers)
            if resized:
                log(
                    f"note: {resized} of {len(headers)} images resized to {w}x{h}, the most common size; "
                    "choose the size with --image-size"
                )
            preprocess = Preprocess.squash(channels, h, w)
        else:
            preprocess = Preprocess.centre_crop(channels, image_size)
    arrays: dict[str, list] = {"train_images": [], "train_labels": [], "test_images": [], "test_labels": []}
    for path in files:
        try:
            pixels = preprocess.load(path)
        except ImageError as exc:
            raise DatasetError(f"{exc}; remove or replace it") from None
        split, class_name = split_of(root, path)
        arrays[f"{split}_images"].append(pixels)
        arrays[f"{split}_labels"].append(classes.index(class_name))
    if not arrays["test_images"]:
        raise DatasetError(f"{root}: the test split holds no images")
    out = {k: (np.stack(v) if "images" in k else np.asarray(v, dtype=np.int64)) for k, v in arrays.items()}
    return out, classes, [{"file": str(root), "sha256": "", "status": "own files"}], preprocess
