"""Prediction on image files: each image converted to what the model expects, unreadable files skipped."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from ..data.imagefolder import IMAGE_EXTENSIONS
from ..data.images import open_image
from ..errors import ImageError
from .evaluate import inference_runtime, prepare_for_inference
from .weights import LoadedModel

__all__ = ["predict_files", "expand_inputs", "load_image", "MIN_IMAGE_SIDE"]

MIN_IMAGE_SIDE = 8  # below this an image holds too little to classify; upscaling would only invent pixels


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the image files inside them (recursively, sorted)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(item)
    return paths


def load_image(path: Path, shape: tuple[int, int, int], resize: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Read `path` as uint8 (C, H, W) in the model's mode and size; returns the array and notes on conversions.

    With `resize`, the shorter side is scaled to `resize` and the centre cropped to H x W (ImageNet's
    evaluation transform); without, the image is resized to H x W directly.
    """
    c, h, w = shape
    notes = []
    im = open_image(path)
    try:
        mode_wanted = "L" if c == 1 else "RGB"
        if min(im.size) < MIN_IMAGE_SIDE:
            raise ImageError(f"{path}: {im.size[0]}x{im.size[1]} pixels is too small to classify "
                             f"(at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}; the model expects {w}x{h})")
        if im.mode != mode_wanted:
            notes.append(f"converted {im.mode} to {mode_wanted}")
            im = im.convert(mode_wanted)
        if resize is not None:
            scale = resize / min(im.size)
            im = im.resize((max(round(im.size[0] * scale), w), max(round(im.size[1] * scale), h)),
                           Image.BILINEAR)
            left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
            im = im.crop((left, top, left + w, top + h))
        elif im.size != (w, h):
            notes.append(f"resized {im.size[0]}x{im.size[1]} to {w}x{h}")
            im = im.resize((w, h), Image.BILINEAR)
        pixels = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as exc:  # a decoded image that still fails to convert or resize
        raise ImageError(f"{path}: cannot be converted ({type(exc).__name__}: {exc})") from None
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return pixels, notes


def _batches(paths: list[Path], shape, batch_size: int, bad: list[dict], resize: int | None = None
             ) -> Iterator[tuple[list, np.ndarray, list]]:
    """Stream images in batches so memory stays bounded however many files there are."""
    batch, names, notes = [], [], []
    for path in paths:
        try:
            pixels, note = load_image(path, shape, resize)
        except ImageError as exc:
            bad.append({"file": str(path), "error": str(exc)})
            continue
        batch.append(pixels)
        names.append(str(path))
        notes.append(note)
        if len(batch) == batch_size:
            yield names, np.stack(batch), notes
            batch, names, notes = [], [], []
    if batch:
        yield names, np.stack(batch), notes


@torch.inference_mode()
def predict_files(loaded: LoadedModel, paths: list[Path], top_k: int = 5, batch_size: int = 256,
                  on_result: Callable[[dict], None] | None = None, precision: str = "auto"
                  ) -> tuple[list[dict], list[dict]]:
    """Top-k classes with probabilities for each readable image; returns (results, bad files)."""
    runtime = inference_runtime(next(loaded.model.parameters()).device, precision)
    model = prepare_for_inference(loaded.model, runtime)
    device = runtime.device
    k = min(top_k, len(loaded.classes))
    results, bad = [], []
    for names, pixels, notes in _batches(paths, loaded.input_shape, batch_size, bad, loaded.meta.get("resize")):
        x = loaded.normalise(torch.from_numpy(pixels).to(device))
        with runtime.autocast():
            probs = model(x.contiguous(memory_format=runtime.memory_format)).float().softmax(1)
        top = probs.topk(k, dim=1)
        for name, p, i, note in zip(names, top.values.tolist(), top.indices.tolist(), notes):
            result = {"file": name, "top": [{"class": loaded.classes[j], "index": j, "probability": q}
                                            for q, j in zip(p, i)], "notes": note}
            results.append(result)
            if on_result:
                on_result(result)
    return results, bad
