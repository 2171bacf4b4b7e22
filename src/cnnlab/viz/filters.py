"""What a trained network holds: its filters, as in the AlexNet figure, and its feature maps for one image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from matplotlib.figure import Figure

from ..errors import ModelError
from .figure import image_grid

__all__ = [
    "conv_layers",
    "layer_weight",
    "filter_images",
    "plot_filters",
    "feature_maps",
    "default_feature_layers",
    "layer_kinds",
    "plot_feature_maps",
]


def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Every Conv2d by its dotted name, in registration order (the first is the input layer)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def layer_weight(model: nn.Module, layer: str | None = None) -> tuple[str, torch.Tensor]:
    """(name, weight (K, C, kh, kw)) of the conv layer `layer`, or of the first conv layer."""
    convs = conv_layers(model)
    if not convs:
        raise ModelError(f"{type(model).__name__} has no convolution layer, so it has no filters to show")
    if layer is None:
        layer = next(iter(convs))
    if layer not in convs:
        raise ModelError(f"no convolution layer {layer!r}; valid layers: {', '.join(convs)}")
    return layer, convs[layer].weight.detach().float().cpu()


def _unit(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Scale each slice over `axes` to [0, 1] (a constant one becomes mid-grey): each filter gets its own range,
    as in AlexNet's figure. Vectorised: a deep layer holds millions of kernels."""
    lo, hi = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    flat = hi - lo < 1e-12
    return np.where(flat, 0.5, (x - lo) / np.where(flat, 1.0, hi - lo))


def filter_images(weight: torch.Tensor, first_layer: bool = True) -> np.ndarray:
    """Images to draw. First layer: (K, kh, kw, 3) colour for 3-channel input, else (K, kh, kw) grey per filter.
    Deeper layers: (K, C, kh, kw), one grey kernel per input channel, each scaled on its own."""
    w = weight.numpy()
    if first_layer and w.shape[1] == 3:
        return _unit(w.transpose(0, 2, 3, 1), (1, 2, 3))
    if first_layer and w.shape[1] == 1:
        return _unit(w[:, 0], (1, 2))
    return _unit(w, (2, 3))


def plot_filters(
    weight: torch.Tensor,
    path: str | Path | None = None,
    layer: str = "",
    first_layer: bool = True,
    title: str = "",
    max_rows: int = 64,
    max_cols: int = 64,
) -> Figure:
    """A grid of filters: first layer as in the AlexNet figure; deeper layers one row per output channel."""
    images = filter_images(weight, first_layer)
    k, c, kh, kw = weight.shape
    shown = f"{k} filters of {c}x{kh}x{kw}"
    title = title or f"{layer or 'conv'}: {shown}, each scaled to its own [0, 1]"
    if first_layer and c in (1, 3):
        cols = int(np.ceil(np.sqrt(k)))
        return image_grid(
            list(images), cols, vmin=0, vmax=1, title=title, cell_inches=max(kh / 18, 4 / cols), path=path
        )
    rows, cols = min(k, max_rows), min(c, max_cols)
    cells = [images[r, j] for r in range(rows) for j in range(cols)]
    return image_grid(
        cells,
        cols,
        vmin=0,
        vmax=1,
        title=title,
        cell_inches=max(kh / 18, 4 / cols),
        xlabel=f"input channel (first {cols} of {c})",
        ylabel=f"output channel (first {rows} of {k})",
        path=path,
    )


def feature_maps(model: nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """The outputs of the named modules for input `x` (N, C, H, W); the hooks are removed whatever happens."""
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules or name == ""]
    if unknown:
        valid = [n for n in modules if n]
        raise ModelError(f"no layer {', '.join(map(repr, unknown))}; valid layers: {', '.join(valid)}")
    captured: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in layers:

            def hook(module, inputs, output, name=name):
                captured[name] = output.detach().float().cpu()

            handles.append(modules[name].register_forward_hook(hook))
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                model(x)
        finally:
            model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return {name: captured[name] for name in layers if name in captured}


def default_feature_layers(model: nn.Module, count: int = 3) -> list[str]:
    """The first `count` conv layers, where the maps still look like the image, and the last, where they no
    longer do."""
    names = list(conv_layers(model))
    if not names:
        raise ModelError(f"{type(model).__name__} has no convolution layer; name layers with --layers")
    return names[:count] + names[-1:] if len(names) > count else names


def layer_kinds(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Each named layer's class name ('Conv2d', 'BasicBlock'), to label the layers that are only numbers."""
    return {name: type(model.get_submodule(name)).__name__ for name in names}


def plot_feature_maps(
    maps: dict[str, torch.Tensor],
    image: np.ndarray,
    path: str | Path | None = None,
    max_channels: int = 16,
    title: str = "",
    kinds: dict[str, str] | None = None,
) -> Figure:
    """The input image (H, W, C), then one row per layer with up to `max_channels` activation maps of the first
    image, each on its own scale; a dense layer's units as one square block. Rows are labelled with the layer's
    name, its kind from `kinds` (e.g. `layer_kinds`: "3 (Conv2d)") and its output shape."""
    pixels = np.asarray(image)
    cells = [pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels] + [None] * (max_channels - 1)
    row_labels = ["input"]
    for name, act in maps.items():
        if act.ndim == 4:
            shown = [channel.numpy() for channel in act[0, :max_channels]]
        else:  # a dense layer: its units wrapped into a square, NaN (white) past the last one
            units = act[0].flatten().numpy().astype(np.float64)
            side = int(np.ceil(np.sqrt(units.size)))
            shown = [np.append(units, np.full(side * side - units.size, np.nan)).reshape(side, side)]
        cells += shown + [None] * (max_channels - len(shown))
        kind = (kinds or {}).get(name)
        row_labels.append(f"{name} ({kind})\n{tuple(act.shape)}" if kind else f"{name}\n{tuple(act.shape)}")
    return image_grid(
        cells,
        max_channels,
        cmap="viridis",
        row_labels=row_labels,
        fontsize=7,
        path=path,
        title=title or "Feature maps (each map on its own colour scale, viridis: dark low, yellow high)",
    )
