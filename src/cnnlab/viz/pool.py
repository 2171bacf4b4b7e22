"""Pooling, shown: 2x2 max pooling on a real feature map, each window's maximum outlined, and what the smaller
map saves the next conv layer (in MACs; 1 MAC = 2 FLOPs)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from . import _grid  # noqa: E402
from .conv import edge_feature_map  # noqa: E402

__all__ = ["max_pool_by_hand", "conv_macs", "render_pool"]


def max_pool_by_hand(x, kernel: int = 2, stride: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) -> the maximum of each kernel x kernel window, (C, Ho, Wo), and where it was: the flat index
    row * W + column within its channel, as `torch.nn.functional.max_pool2d(..., return_indices=True)` gives.

    On ties the first maximum in reading order wins, as in PyTorch's CPU kernel (ReLU maps have many zeros).
    """
    x = _grid.as_array(x)
    if x.ndim != 3:
        raise ConfigError(f"expected a feature map (C, H, W); got shape {x.shape}")
    if kernel < 1 or stride < 1:
        raise ConfigError(f"kernel and stride must be >= 1; got kernel={kernel}, stride={stride}")
    C, H, W = x.shape
    Ho, Wo = (H - kernel) // stride + 1, (W - kernel) // stride + 1  # no padding; a partial last window is dropped
    if Ho < 1 or Wo < 1:
        raise ConfigError(f"a {kernel}x{kernel} window does not fit a {H}x{W} map")
    values = np.zeros((C, Ho, Wo), dtype=x.dtype)
    indices = np.zeros((C, Ho, Wo), dtype=np.int64)
    for c in range(C):  # pooling acts on each channel alone: the channel count never changes
        for i in range(Ho):
            for j in range(Wo):
                r0, c0 = i * stride, j * stride
                window = x[c, r0:r0 + kernel, c0:c0 + kernel]
                u, v = divmod(int(np.argmax(window)), kernel)  # argmax: the first maximum in reading order
                values[c, i, j] = window[u, v]
                indices[c, i, j] = (r0 + u) * W + (c0 + v)
    return values, indices


def conv_macs(height: int, width: int, c_in: int, c_out: int, kernel: int = 3) -> int:
    """Multiply-accumulates of a kernel x kernel conv with 'same' padding and stride 1 on a height x width input:
    each of the height*width*c_out outputs sums kernel*kernel*c_in products."""
    return height * width * c_out * c_in * kernel * kernel


def render_pool(out_dir: str | Path, feature_map=None, kernel: int = 2, stride: int = 2, c_in: int | None = None,
                c_out: int = 64, next_kernel: int = 3, channel: int = 0) -> dict:
    """Draw `kernel` x `kernel` max pooling (stride `stride`) of `feature_map` into out_dir/pool.png.

    `feature_map`: (C, H, W) or (H, W); default: slide (a)'s vertical-edge map of the default image after ReLU,
    (1, 16, 16). The MACs are those of a following `next_kernel` x `next_kernel` conv from `c_in` (default: the
    map's channels) to `c_out` channels, on the map before and after pooling. Returns the shapes, the MACs and
    their ratio, the caption and the path.
    """
    fmap = edge_feature_map() if feature_map is None else _grid.as_array(feature_map)
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
    caption = (f"The next layer, a {next_layer}: {macs_before:,} MACs per image on {H}x{W}, {macs_after:,} on "
               f"{Ho}x{Wo}: {ratio:.2f}x fewer (1 MAC = 2 FLOPs)")

    a = fmap[channel].astype(float)
    cmap = colormaps["viridis"]
    norm = Normalize(float(min(a.min(), 0)), float(max(a.max(), 1e-9)))
    cell = 0.3  # inches per cell in both panels, so the pooled map is visibly a quarter of the area
    fig = _grid.new_figure(cell * (W + Wo) + 3.0, cell * H + 1.6, dpi=90)
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
    ax.set_title(f"feature map {H}x{W}" + (f" (channel {channel} of {C})" if C > 1 else "")
                 + f": {kernel}x{kernel} windows, maximum outlined", fontsize=10)

    ax = fig.add_subplot(gs[1])
    im, _ = _grid.draw_grid(ax, pooled[channel].astype(float), cmap, norm, 7)
    _grid.outline(ax, top[0], top[1], 1, 1, colour=_grid.SECOND, lw=3)
    _grid.grid_ticks(ax, Ho, Wo, step=2)
    ax.set(xlabel="column", ylabel="row")
    ax.set_title(f"after max pooling: {Ho}x{Wo}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="activation")

    fig.suptitle(f"Max pooling {kernel}x{kernel}, stride {stride}: {(C, H, W)} -> {(C, Ho, Wo)}, "
                 f"{H * W / (Ho * Wo):.2f}x fewer numbers per channel", fontsize=12)
    fig.supxlabel(caption, fontsize=9)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = _grid.save_figure(fig, out_dir / "pool.png")
    return {"path": path, "shape_before": (C, H, W), "shape_after": (C, Ho, Wo), "next_layer": next_layer,
            "macs_before": macs_before, "macs_after": macs_after, "mac_ratio": ratio, "caption": caption}
