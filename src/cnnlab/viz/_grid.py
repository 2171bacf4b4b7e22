"""The slides' drawing: arrays as grids of numbered cells, window outlines, and frames to GIF/PNG.

Figures come from `figure.new_figure` (an Agg canvas, no pyplot), so rendering many animation frames keeps no
global figure state and needs no `plt.close`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import cast

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from ..files import save_atomic
from .figure import OKABE_ITO

HIGHLIGHT = OKABE_ITO["orange"]  # stands out on grey, viridis and RdBu alike, for colour-blind readers too
SECOND = OKABE_ITO["bluish green"]  # a second kind of highlight
PAD_COLOUR = "white"  # zero-padding cells, hatched: grey would read as image data on a grey image


def freeze_layout(fig: Figure) -> None:
    """Lay out once, then keep every axes in place, so titles that change between frames cannot shift the panels."""
    engine = fig.get_layout_engine()
    assert engine is not None  # the slides make their figures with a layout engine
    engine.execute(fig)  # measures text extents without rasterising anything
    fig.set_layout_engine("none")


def fmt_number(value: float) -> str:
    """Integers without a decimal point (the worked examples are integer), others to one decimal (two below 1)."""
    if not np.isfinite(value):
        return ""
    if abs(value - round(value)) < 1e-9:
        return str(int(round(value)))
    return f"{value:.1f}" if abs(value) >= 0.95 else f"{value:.2f}"


def symmetric_norm(values: np.ndarray) -> Normalize:
    """Zero at the middle of a diverging colormap, so sign reads as hue and magnitude as depth."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    m = float(np.abs(finite).max()) if finite.size else 1.0
    m = m or 1.0
    return TwoSlopeNorm(0.0, -m, m)


def text_colour(cmap: Colormap, norm: Normalize, value: float) -> str:
    """Black on light cells, white on dark ones (relative luminance of the cell's colour)."""
    if not np.isfinite(value):
        return "#777777"
    r, g, b, _ = cmap(norm(value))
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def draw_grid(
    ax,
    values: np.ndarray,
    cmap: Colormap,
    norm: Normalize,
    fontsize: float,
    origin: tuple[int, int] = (0, 0),
    labels: np.ndarray | None = None,
    animated: bool = False,
):
    """Show a 2-D array as coloured cells with each number written in its cell; NaN cells use the colormap's
    'bad' colour. `origin` = the (row, column) index of the top-left cell, so padded arrays keep image coordinates.

    Returns the image artist and a (rows, cols) object array of the text artists (to update frame by frame).
    """
    rows, cols = values.shape
    r0, c0 = origin
    im = ax.imshow(
        values,
        cmap=cmap,
        norm=norm,
        interpolation="nearest",
        extent=(c0 - 0.5, c0 + cols - 0.5, r0 + rows - 0.5, r0 - 0.5),
        animated=animated,
    )
    texts = np.empty((rows, cols), dtype=object)
    for r in range(rows):
        for c in range(cols):
            v = values[r, c]
            s = fmt_number(v) if labels is None else labels[r, c]
            texts[r, c] = ax.text(
                c0 + c,
                r0 + r,
                s,
                ha="center",
                va="center",
                fontsize=fontsize,
                color=text_colour(cmap, norm, v),
                animated=animated,
            )
    return im, texts


def outline(
    ax,
    row: float | np.integer,
    col: float | np.integer,
    height: int,
    width: int,
    colour: str = HIGHLIGHT,
    lw: float = 2.5,
    animated: bool = False,
) -> Rectangle:
    """A rectangle around cells row..row+height-1, col..col+width-1 (cell centres at integer coordinates)."""
    rect = Rectangle(
        (col - 0.5, row - 0.5), width, height, fill=False, edgecolor=colour, linewidth=lw, zorder=5, animated=animated
    )
    ax.add_patch(rect)
    return rect


def hatch_padding(ax, height: int, width: int, padding: int) -> None:
    """Hatch the ring of zero padding around an image of height x width cells (image coordinates)."""
    if padding <= 0:
        return
    p = padding
    for row, col, h, w in (
        (-p, -p, p, width + 2 * p),
        (height, -p, p, width + 2 * p),
        (0, -p, height, p),
        (0, width, height, p),
    ):
        ax.add_patch(
            Rectangle((col - 0.5, row - 0.5), w, h, fill=False, hatch="///", edgecolor="#bbbbbb", linewidth=0, zorder=1)
        )
    ax.add_patch(
        Rectangle((-0.5, -0.5), width, height, fill=False, edgecolor="#555555", linewidth=1, zorder=4, linestyle="--")
    )


def grid_ticks(ax, rows: int, cols: int, origin: tuple[int, int] = (0, 0), step: int = 4) -> None:
    """Sparse integer ticks in image coordinates: every cell would be unreadable at 16+ cells."""
    r0, c0 = origin
    ax.set_xticks([c for c in range(c0, c0 + cols) if c % step == 0])
    ax.set_yticks([r for r in range(r0, r0 + rows) if r % step == 0])
    ax.tick_params(labelsize=7, length=2)


def write_png(frame: np.ndarray, path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", optimize=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # as save_png: the folder only once there is a file for it
    save_atomic(buffer.getvalue(), Path(path))
    return Path(path)


def write_gif(frames: list[np.ndarray], path: Path, frame_ms: int = 350, last_ms: int = 2500) -> Path:
    """An animated GIF, looping, with one palette for every frame.

    The palette comes from the last frame (every map filled in), so colours do not flicker between frames;
    no dithering, because dither noise defeats the compression of flat cells. 255 colours leave one palette
    index free, which Pillow's `optimize` uses to mark pixels unchanged since the previous frame as transparent:
    a frame then costs little more than the cells that changed.
    """
    palette = Image.fromarray(frames[-1]).quantize(255, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    images = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        loop=0,
        optimize=True,
        duration=[frame_ms] * (len(images) - 1) + [last_ms],
        disposal=1,
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_atomic(buffer.getvalue(), Path(path))
    return Path(path)


class Blitter:
    """Draw a figure's static parts once, then per frame only its animated artists (those made with
    `animated=True`): text drawing dominates Agg's time, and most of a slide's numbers never change."""

    def __init__(self, fig: Figure):
        self.fig, self.canvas = fig, cast(FigureCanvasAgg, fig.canvas)  # new_figure's canvas
        self.canvas.draw()  # skips animated artists
        self.background = self.canvas.copy_from_bbox(fig.bbox)

    def restore(self, region=None) -> None:
        self.canvas.restore_region(self.background if region is None else region)

    def copy(self, bbox):
        return self.canvas.copy_from_bbox(bbox)

    def draw(self, *artists) -> None:
        for a in artists:
            self.fig.draw_artist(a)

    def rgb(self) -> np.ndarray:
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()
