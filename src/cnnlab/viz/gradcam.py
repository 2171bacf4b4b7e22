"""Grad-CAM (Selvaraju et al. 2017): which part of an image decided a class, from the gradients of that class's
logit with respect to one convolutional layer's maps.

    weights[k] = mean over (i, j) of  d logit_c / d A[k, i, j]      (one number per map of the layer)
    cam[i, j]  = ReLU(sum over k of  weights[k] * A[k, i, j])

then upsampled (bilinear) to the input's size. The default layer is the last convolutional stage, found by
running the model once, so it works for every registered model.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..errors import ModelError

__all__ = [
    "CamResult",
    "grad_cam",
    "grad_cams",
    "cam_layers",
    "default_cam_layer",
    "overlay",
    "save_overlay",
    "png_data_uri",
    "class_index",
    "cam_files",
]

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d)


@dataclass
class CamResult:
    """One image's Grad-CAM: `cam` (H, W) in the input's size, >= 0 and not rescaled; `raw` at the layer's size;
    `weights` (K,) per map; the class it explains, and the model's probabilities."""

    layer: str
    target: int
    cam: torch.Tensor
    raw: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor


@contextmanager
def _no_inplace(model: nn.Module) -> Iterator[None]:
    """In-place activations (ReLU(inplace=True)) would overwrite a captured map after its hook ran; switch them
    off while capturing, and back after."""
    changed: list[Any] = [m for m in model.modules() if getattr(m, "inplace", False) is True]  # ReLU and kin
    for m in changed:
        m.inplace = False
    try:
        yield
    finally:
        for m in changed:
            m.inplace = True


def _spatial_outputs(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, nn.Module, tuple]]:
    """(name, module, output shape) of every named module whose output is (N, C, H, W), in the order they run,
    measured on one zero image."""
    calls: list[tuple[str, nn.Module, tuple]] = []
    seen: set[str] = set()

    def hook(name):
        def record(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4 and name not in seen:
                seen.add(name)
                calls.append((name, module, tuple(output.shape[1:])))

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        was_training = model.training
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=device))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return calls


def cam_layers(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Names of the layers Grad-CAM can use: every module that gives (N, C, H, W) maps, in running order."""
    return [name for name, _, _ in _spatial_outputs(model, input_shape)]


def default_cam_layer(model: nn.Module, input_shape: Sequence[int]) -> str:
    """The last convolutional stage: among the model's own top-level parts (a ResNet's `layer3`, a sequential
    net's last ReLU), the last that gives maps larger than 1x1 and is not a pooling layer."""
    calls = _spatial_outputs(model, input_shape)
    top = [(name, module, shape) for name, module, shape in calls if "." not in name and shape[1] * shape[2] > 1]
    candidates = [name for name, module, _ in top if not isinstance(module, _POOLS)] or [n for n, _, _ in top]
    if not candidates:
        raise ModelError(
            f"{type(model).__name__} gives no maps larger than 1x1 at input {tuple(input_shape)}; "
            "Grad-CAM needs a convolutional layer"
        )
    return candidates[-1]


def grad_cam(
    model: nn.Module, x: torch.Tensor, layer: str | None = None, target: int | Sequence[int] | None = None
) -> list[CamResult]:
    """Grad-CAM of `layer` (default: `default_cam_layer`) for each image in `x` (N, C, H, W, already normalised)
    and class `target`: one index for all, one per image, or None for each image's predicted class."""
    return grad_cams(model, x, layer, [target])[0]


def grad_cams(model: nn.Module, x: torch.Tensor, layer: str | None, targets: Sequence) -> list[list[CamResult]]:
    """`grad_cam` for several targets (each as `grad_cam` takes it) from one forward pass: one list per target."""
    modules = dict(model.named_modules())
    layer = layer or default_cam_layer(model, tuple(x.shape[1:]))
    if layer not in modules or not layer:
        valid = cam_layers(model, tuple(x.shape[1:]))
        raise ModelError(f"no layer {layer!r} for Grad-CAM; layers with maps: {', '.join(valid)}")
    captured: list[torch.Tensor] = []
    handle = modules[layer].register_forward_hook(lambda m, i, out: captured.append(out))
    was_training = model.training
    out: list[list[CamResult]] = []
    try:
        with torch.enable_grad(), _no_inplace(model):
            model.eval()
            inp = x.detach().clone().requires_grad_(True)  # the maps need a graph even if the weights are frozen
            logits = model(inp).float()
            if len(captured) != 1 or captured[0].dim() != 4:
                got = (
                    "never ran"
                    if not captured
                    else f"ran {len(captured)} times"
                    if len(captured) > 1
                    else f"gives shape {tuple(captured[0].shape)}"
                )
                raise ModelError(
                    f"layer {layer!r} {got}; Grad-CAM needs one (N, C, H, W) output per image: "
                    f"choose one of {', '.join(cam_layers(model, tuple(x.shape[1:])))}"
                )
            maps = captured[0]
            n, classes = logits.shape
            probs = logits.detach().softmax(1).cpu()
            for k, target in enumerate(targets):
                if target is None:
                    chosen = logits.argmax(1).tolist()
                elif isinstance(target, int):
                    chosen = [target] * n
                else:
                    chosen = [int(t) for t in target]
                bad = [t for t in chosen if not 0 <= t < classes]
                if bad or len(chosen) != n:
                    raise ModelError(
                        f"class index {bad[0] if bad else chosen} is not valid: the model has {classes} "
                        f"classes (0..{classes - 1}), one target per image ({n})"
                    )
                # images are independent in eval mode, so one backward of the summed scores gives each its gradient
                score = logits.gather(1, torch.tensor(chosen, device=logits.device)[:, None]).sum()
                (grads,) = torch.autograd.grad(score, maps, retain_graph=k < len(targets) - 1)
                a, g = maps.detach().float(), grads.float()
                weights = g.mean(dim=(2, 3))  # (N, K)
                raw = F.relu((weights[:, :, None, None] * a).sum(1))  # (N, h, w)
                cam = F.interpolate(raw[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
                cam = cam.clamp_min(0)
                out.append(
                    [
                        CamResult(layer, t, cam[i].cpu(), raw[i].cpu(), weights[i].cpu(), probs[i])
                        for i, t in enumerate(chosen)
                    ]
                )
    finally:
        handle.remove()
        model.train(was_training)
    return out


# Okabe-Ito-friendly heat: transparent for 0, through orange to vermillion-red at the maximum
def _heat(v: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB in [0, 1]: black-body-like (dark red, orange, yellow), readable over grey and colour."""
    r = np.clip(1.6 * v, 0, 1)
    g = np.clip(1.6 * v - 0.6, 0, 1)
    b = np.clip(3.0 * v - 2.0, 0, 1) * 0.6
    return np.stack([r, g, b], -1)


def overlay(image: np.ndarray, cam: torch.Tensor | np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The input image (H, W, C) uint8, 1 or 3 channels, under the CAM (H, W) scaled to its own maximum: uint8
    (H, W, 3). Where the CAM is 0 the image shows unchanged."""
    cam = np.asarray(cam, dtype=np.float32)
    peak = float(cam.max())
    v = cam / peak if peak > 0 else np.zeros_like(cam)
    rgb = image.astype(np.float32) / 255
    if rgb.ndim == 2:
        rgb = rgb[..., None]
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    a = alpha * v[..., None]
    return np.round(255 * ((1 - a) * rgb + a * _heat(v))).astype(np.uint8)


def _scaled(rgb: np.ndarray, scale: int) -> Image.Image:
    return Image.fromarray(np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1))


def save_overlay(image: np.ndarray, cam, path: str | Path, scale: int = 1) -> Path:
    """Write `overlay(image, cam)` as a PNG, each pixel as a scale x scale block."""
    from ..files import save_atomic

    buffer = io.BytesIO()
    _scaled(overlay(image, cam), scale).save(buffer, format="PNG", optimize=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_atomic(buffer.getvalue(), path)


def png_data_uri(rgb: np.ndarray, scale: int = 1) -> str:
    """uint8 (H, W, 3) or (H, W) as a PNG data: URI."""
    buffer = io.BytesIO()
    _scaled(rgb, scale).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def class_index(classes: Sequence[str], name: str | int | None) -> int | None:
    """A class given by name or index -> its index (None stays None: the predicted class)."""
    if name is None or isinstance(name, int):
        return name
    if name in classes:
        return list(classes).index(name)
    if name.isdigit() and int(name) < len(classes):
        return int(name)
    raise ModelError(f"no class {name!r}; classes: {', '.join(classes)} (or an index 0..{len(classes) - 1})")


def cam_files(
    loaded,
    paths: Sequence[str | Path],
    out: str | Path,
    layer: str | None = None,
    target: str | int | None = None,
    min_side: int = 128,
) -> list[tuple[Path, CamResult]]:
    """Grad-CAM overlays of image files for a loaded model (`cnnlab.inference.weights.LoadedModel`), as
    OUT/cam-<stem>-<class>.png, each image enlarged by a whole factor to at least `min_side` pixels. Every file
    is read before anything is written, so a bad one leaves no half-done folder."""
    from ..inference.predict import load_image

    index = class_index(loaded.classes, target)
    images = [load_image(Path(p), loaded.preprocess)[0] for p in paths]
    x = loaded.normalise(torch.from_numpy(np.stack(images)).to(next(loaded.model.parameters()).device))
    results = grad_cam(loaded.model, x, layer, index)
    scale = max(1, -(-min_side // max(images[0].shape[1:])))
    written = []
    for p, pixels, r in zip(paths, images, results):
        name = loaded.classes[r.target].replace("/", "_").replace(" ", "_")
        path = save_overlay(
            pixels.transpose(1, 2, 0).squeeze(-1) if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0),
            r.cam.numpy(),
            Path(out) / f"cam-{Path(p).stem}-{name}.png",
            scale,
        )
        written.append((path, r))
    return written
