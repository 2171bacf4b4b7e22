"""What a trained network holds: its filters, as in the AlexNet figure, and its feature maps for one image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import ModelError
from .plots import _save, plt

__all__ = ["conv_layers", "layer_weight", "filter_images", "plot_filters", "feature_maps", "default_feature_layers",
           "plot_feature_maps"]


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


def _unit(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] (a constant filter becomes mid-grey): each filter gets its own range, as in AlexNet's figure."""
    lo, hi = x.min(), x.max()
    return np.full_like(x, 0.5) if hi - lo < 1e-12 else (x - lo) / (hi - lo)


def filter_images(weight: torch.Tensor, first_layer: bool = True) -> np.ndarray:
    """Images to draw. First layer: (K, kh, kw, 3) colour for 3-channel input, else (K, kh, kw) grey per filter.
    Deeper layers: (K, C, kh, kw), one grey kernel per input channel, each scaled on its own."""
    w = weight.numpy()
    if first_layer and w.shape[1] == 3:
        return np.stack([_unit(f.transpose(1, 2, 0)) for f in w])
    if first_layer and w.shape[1] == 1:
        return np.stack([_unit(f[0]) for f in w])
    return np.stack([np.stack([_unit(k) for k in f]) for f in w])


def plot_filters(weight: torch.Tensor, path: Path, layer: str = "", first_layer: bool = True, title: str = "",
                 max_rows: int = 64, max_cols: int = 64) -> Path:
    """A grid of filters: first layer as in the AlexNet figure; deeper layers one row per output channel."""
    images = filter_images(weight, first_layer)
    k, c, kh, kw = weight.shape
    if first_layer and c in (1, 3):
        cols = int(np.ceil(np.sqrt(k)))
        rows = int(np.ceil(k / cols))
        cells = [images[i] for i in range(k)]
        grid_shape = (rows, cols)
    else:
        rows, cols = min(k, max_rows), min(c, max_cols)
        cells = [images[r, j] for r in range(rows) for j in range(cols)]
        grid_shape = (rows, cols)
    # one mosaic image with a 1-pixel gap is far quicker to draw than hundreds of subplots
    pad = 1
    colour = cells[0].ndim == 3
    mosaic = np.ones((grid_shape[0] * (kh + pad) - pad, grid_shape[1] * (kw + pad) - pad) + ((3,) if colour else ()))
    for i, cell in enumerate(cells):
        r, j = divmod(i, grid_shape[1])
        mosaic[r * (kh + pad):r * (kh + pad) + kh, j * (kw + pad):j * (kw + pad) + kw] = cell
    inches = min(max(mosaic.shape[1] / 18, 4.0), 14.0)
    fig, ax = plt.subplots(figsize=(inches, inches * mosaic.shape[0] / mosaic.shape[1] + 0.8))
    ax.imshow(mosaic, cmap=None if colour else "gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if not (first_layer and c in (1, 3)):
        ax.set_xlabel(f"input channel (first {cols} of {c})")
        ax.set_ylabel(f"output channel (first {rows} of {k})")
    shown = f"{k} filters of {c}x{kh}x{kw}"
    ax.set_title(title or f"{layer or 'conv'}: {shown}, each scaled to its own [0, 1]")
    path = Path(path)
    _save(fig, path)
    return path


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
    """The first `count` conv layers: where the maps still look like the image."""
    names = list(conv_layers(model))
    if not names:
        raise ModelError(f"{type(model).__name__} has no convolution layer; name layers with --layers")
    return names[:count]


def plot_feature_maps(maps: dict[str, torch.Tensor], image: np.ndarray, path: Path, max_channels: int = 16,
                      title: str = "") -> Path:
    """The input image, then one row per layer with up to `max_channels` activation maps of the first image."""
    rows = len(maps)
    cols = max_channels
    fig, axes = plt.subplots(rows + 1, cols, figsize=(cols * 0.9 + 1.5, (rows + 1) * 1.05 + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0][0].imshow(image if image.ndim == 3 and image.shape[2] == 3 else image.squeeze(),
                      cmap=None if image.ndim == 3 and image.shape[2] == 3 else "gray", interpolation="nearest")
    axes[0][0].set_title("input", fontsize=8)
    for r, (name, act) in enumerate(maps.items(), start=1):
        act = act[0] if act.ndim == 4 else act[:1].reshape(1, 1, -1)  # a dense layer: one strip of units
        shown = act[:max_channels]
        for j, channel in enumerate(shown):
            axes[r][j].imshow(channel.numpy(), cmap="viridis", interpolation="nearest")
        axes[r][0].set_title(f"{name} {tuple(act.shape)}", fontsize=8, loc="left")
    fig.suptitle(title or "Feature maps (each map on its own colour scale, viridis: dark low, yellow high)")
    path = Path(path)
    _save(fig, path)
    return path
