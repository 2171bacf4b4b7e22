"""Prediction on image files: each image converted to what the model expects, unreadable files skipped."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.imagefolder import IMAGE_EXTENSIONS
from ..data.images import read_image_file
from ..data.preprocess import Preprocess
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


def load_image(path: Path, preprocess: Preprocess) -> tuple[np.ndarray, list[str]]:
    """Read `path` as the model's uint8 input (C, H, W) by its recorded preprocessing; returns the array and notes
    on what was done to the file (colour conversion, resizing)."""
    data = read_image_file(path)
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode, (width, height) = im.mode, im.size
    except Exception:  # not an image at all: the decoder below names the file and the reason
        mode, width, height = "", 0, 0
    if mode and min(width, height) < MIN_IMAGE_SIDE:
        raise ImageError(
            f"{path}: {width}x{height} pixels is too small to classify "
            f"(at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}; the model expects {preprocess.size[1]}x"
            f"{preprocess.size[0]})"
        )
    pixels = preprocess.pixels(data, str(path))
    notes = []
    if mode and mode != preprocess.mode:
        notes.append(f"converted {mode} to {preprocess.mode}")
    h, w = preprocess.size
    if mode and preprocess.resize == "shorter":
        notes.append(f"resized {width}x{height} (shorter side to {preprocess.resize_to}) and kept the centre {w}x{h}")
    elif mode and (height, width) != preprocess.size:
        notes.append(f"resized {width}x{height} to {w}x{h}")
    return pixels, notes


def _batches(
    paths: list[Path], preprocess: Preprocess, batch_size: int, bad: list[dict]
) -> Iterator[tuple[list, np.ndarray, list]]:
    """Stream images in batches so memory stays bounded however many files there are."""
    batch, names, notes = [], [], []
    for path in paths:
        try:
            pixels, note = load_image(path, preprocess)
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


def predict_files(
    loaded: LoadedModel,
    paths: list[Path],
    top_k: int = 5,
    batch_size: int = 256,
    on_result: Callable[[dict], None] | None = None,
    precision: str = "fp32",
) -> tuple[list[dict], list[dict]]:
    """Top-k classes with probabilities for each readable image; returns (results, bad files). fp32 by default,
    the precision an exported model and `cnnlab eval` compute in; "bf16" or "auto" (as training decides) on request."""
    runtime = inference_runtime(next(loaded.model.parameters()).device, precision)
    # outside inference mode: a memory-format change made inside it would turn the parameters into inference
    # tensors, and the same model could then never take a gradient again (Grad-CAM, fine-tuning)
    model = prepare_for_inference(loaded.model, runtime)
    with torch.inference_mode():
        return _predict(model, loaded, runtime, paths, top_k, batch_size, on_result)


def _predict(
    model,
    loaded: LoadedModel,
    runtime,
    paths: list[Path],
    top_k: int,
    batch_size: int,
    on_result: Callable[[dict], None] | None,
) -> tuple[list[dict], list[dict]]:
    device = runtime.device
    k = min(top_k, len(loaded.classes))
    results: list[dict] = []
    bad: list[dict] = []
    for names, pixels, notes in _batches(paths, loaded.preprocess, batch_size, bad):
        x = loaded.normalise(torch.from_numpy(pixels).to(device))
        with runtime.autocast():
            probs = model(x.contiguous(memory_format=runtime.memory_format)).float().softmax(1)
        top = probs.topk(k, dim=1)
        for name, p, i, note in zip(names, top.values.tolist(), top.indices.tolist(), notes):
            result = {
                "file": name,
                "top": [{"class": loaded.classes[j], "index": j, "probability": q} for q, j in zip(p, i)],
                "notes": note,
            }
            results.append(result)
            if on_result:
                on_result(result)
    return results, bad
