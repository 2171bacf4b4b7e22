"""Pooling, shown: 2x2 max pooling on a real feature map, each window's maximum outlined, and what the smaller
map saves the next conv layer (in MACs; 1 MAC = 2 FLOPs). The numbers come from `conv.max_pool_by_hand`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ..errors import ConfigError
from . import _grid
from .conv import as_array, conv_macs, edge_feature_map, max_pool_by_hand
from .figure import finish, new_figure

__all__ = ["pool_numbers", "plot_pool", "render_pool"]


def pool_numbers(
    feature_map=None,
    kernel: int = 2,
    stride: int = 2,
    c_in: int | None = None,
    c_out: int = 64,
    next_kernel: int = 3,
    channel: int = 0,
) -> dict:
    """Max pooling of `feature_map` ((C, H, W) or (H, W); default: slide (a)'s vertical-edge map of the default
    image after ReLU, (1, 16, 16)) and the MACs of a following `next_kernel` x `next_kernel` conv from `c_in`
    (default: the map's channels) to `c_out` channels, on the map before and after pooling."""
    fmap = edge_feature_map() if feature_map is None else as_array(feature_map)
    if fmap.ndim == 2:
        fmap = fmap[None]
    pooled, indices = max_pool_by_hand(fmap, kernel, stride)
    C, H, W = fmap.shape
    _, Ho, Wo = pooled.shape
    if not 0 <= channel < C:
        raise ConfigError(f"channel {channel} does not exist; the map has {C} channel(s)")
    c_in = C if c_in is None else c_in
    if min(c_in, c_out, next_kernel) < 1:
        raise ConfigError(f"c_in, c_out and next_kernel must be >= 1; got {c_in}, {c_out}, {next_kernel}")
    macs_before, macs_after = conv_macs(H, W, c_in, c_out, next_kernel), conv_macs(Ho, Wo, c_in, c_out, next_kernel)
    ratio = macs_before / macs_after
    next_layer = f"{next_kernel}x{next_kernel} conv, {c_in} -> {c_out} channels, stride 1, 'same' padding"
    caption = (
        f"The next layer, a {next_layer}: {macs_before:,} MACs per image on {H}x{W}, {macs_after:,} on "
        f"{Ho}x{Wo}: {ratio:.2f}x fewer (1 MAC = 2 FLOPs)"
    )
    return {
        "feature_map": fmap,
        "pooled": pooled,
        "indices": indices,
        "kernel": kernel,
        "stride": stride,
        "channel": channel,
        "shape_before": (C, H, W),
        "shape_after": (C, Ho, Wo),
        "next_layer": next_layer,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "mac_ratio": ratio,
        "caption": caption,
    }


def plot_pool(
    feature_map=None,
    kernel: int = 2,
    stride: int = 2,
    c_in: int | None = None,
    c_out: int = 64,
    next_kernel: int = 3,
    channel: int = 0,
    path: str | Path | None = None,
) -> Figure:
    """`kernel` x `kernel` max pooling (stride `stride`) of one channel of `feature_map`, beside the pooled map,
    with the next layer's MACs below (arguments as `pool_numbers`)."""
    info = pool_numbers(feature_map, kernel, stride, c_in, c_out, next_kernel, channel)
    fmap, pooled, indices = info["feature_map"], info["pooled"], info["indices"]
    (C, H, W), (_, Ho, Wo) = info["shape_before"], info["shape_after"]

    a = fmap[channel].astype(float)
    cmap = colormaps["viridis"]
    norm = Normalize(float(min(a.min(), 0)), float(max(a.max(), 1e-9)))
    cell = 0.3  # inches per cell in both panels, so the pooled map is visibly a quarter of the area
    fig = new_figure(cell * (W + Wo) + 3.0, cell * H + 1.6, dpi=90, layout="constrained")
    gs = fig.add_gridspec(1, 2, width_ratios=[W, Wo])

    ax = fig.add_subplot(gs[0])
    _grid.draw_grid(ax, a, cmap, norm, 7)
    if stride == kernel:  # windows tile the map: draw their borders (overlapping windows would only clutter)
        for t in range(0, Ho * stride + 1, stride):
            ax.axhline(t - 0.5, color="white", lw=2)
        for t in range(0, Wo * stride + 1, stride):
            ax.axvline(t - 0.5, color="white", lw=2)
    for q in indices[channel].ravel():
        r, c = divmod(int(q), W)
        _grid.outline(ax, r, c, 1, 1, lw=2)
    top = np.unravel_index(int(np.argmax(pooled[channel])), (Ho, Wo))  # one window followed across both panels
    _grid.outline(ax, top[0] * stride, top[1] * stride, kernel, kernel, colour=_grid.SECOND, lw=3)
    _grid.grid_ticks(ax, H, W)
    ax.set(xlabel="column", ylabel="row")
    ax.set_title(
        f"feature map {H}x{W}"
        + (f" (channel {channel} of {C})" if C > 1 else "")
        + f": {kernel}x{kernel} windows, maximum outlined",
        fontsize=10,
    )

    ax = fig.add_subplot(gs[1])
    im, _ = _grid.draw_grid(ax, pooled[channel].astype(float), cmap, norm, 7)
    _grid.outline(ax, top[0], top[1], 1, 1, colour=_grid.SECOND, lw=3)
    _grid.grid_ticks(ax, Ho, Wo, step=2)
    ax.set(xlabel="column", ylabel="row")
    ax.set_title(f"after max pooling: {Ho}x{Wo}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="activation")

    fig.suptitle(
        f"Max pooling {kernel}x{kernel}, stride {stride}: {(C, H, W)} -> {(C, Ho, Wo)}, "
        f"{H * W / (Ho * Wo):.2f}x fewer numbers per channel",
        fontsize=12,
    )
    fig.supxlabel(info["caption"], fontsize=9)
    return finish(fig, path)


def render_pool(
    out_dir: str | Path,
    feature_map=None,
    kernel: int = 2,
    stride: int = 2,
    c_in: int | None = None,
    c_out: int = 64,
    next_kernel: int = 3,
    channel: int = 0,
) -> dict:
    """Draw the pooling figure into out_dir/pool.png; returns the shapes, the MACs and their ratio, the caption
    and the path (arguments as `pool_numbers`)."""
    info = pool_numbers(feature_map, kernel, stride, c_in, c_out, next_kernel, channel)
    path = Path(out_dir) / "pool.png"
    plot_pool(info["feature_map"], kernel, stride, c_in, c_out, next_kernel, channel, path=path)
    keys = ("shape_before", "shape_after", "next_layer", "macs_before", "macs_after", "mac_ratio", "caption")
    return {"path": path, **{key: info[key] for key in keys}}
