"""One way to draw for all of `viz`: figures on an Agg canvas, saved atomically, and one grid of images.

Figures are `matplotlib.figure.Figure` objects with their own Agg canvas, never pyplot's: no backend is
chosen, no global figure list grows, and nothing needs closing. Every drawing function returns its Figure
and writes a PNG only when given a path. In a notebook a figure that is a cell's value shows itself inline
(`_repr_png_`), and `show` displays several figures, or PNG and GIF files, from one cell.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from PIL import Image

from ..errors import ConfigError
from ..files import save_atomic

__all__ = [
    "OKABE_ITO",
    "DPI",
    "NotebookFigure",
    "new_figure",
    "subplots",
    "png_bytes",
    "save_png",
    "finish",
    "show",
    "image_grid",
]

# Okabe & Ito (2008), "Color Universal Design": eight colours told apart with any colour vision.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky blue": "#56B4E9",
    "bluish green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish purple": "#CC79A7",
}
DPI = 120  # pixels per inch of a saved figure unless it asks for another


class NotebookFigure(Figure):
    """A Figure that Jupyter draws inline when it is a cell's value: as the PNG `png_bytes` gives (pyplot's
    figures show themselves through pyplot's backend, which cnnlab never selects)."""

    def _repr_png_(self) -> bytes:
        return png_bytes(self)


Layout = Literal["constrained", "compressed", "tight"]  # matplotlib's layout engines by name


def new_figure(width: float, height: float, dpi: int = DPI, layout: Layout | None = None) -> Figure:
    """A Figure of width x height inches on its own Agg canvas."""
    fig = NotebookFigure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def subplots(
    nrows: int = 1,
    ncols: int = 1,
    *,
    figsize: tuple[float, float] = (6.4, 4.8),
    dpi: int = DPI,
    layout: Layout | None = None,
    squeeze: bool = True,
    **kwargs,
) -> tuple[Figure, Any]:
    """`pyplot.subplots` without pyplot: (figure, axes) with the same squeeze rules (one Axes, or an array of
    them: Any, as in matplotlib's own annotation)."""
    fig = new_figure(*figsize, dpi=dpi, layout=layout)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze, **kwargs)


def png_bytes(fig: Figure, dpi: float | str = "figure") -> bytes:
    """The figure as PNG bytes, cropped to its content (also what a notebook can display)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def save_png(fig: Figure, path: str | Path, dpi: float | str = "figure") -> Path:
    """Write the figure as PNG, complete or not at all; the folder is made only now that there is a file for it."""
    path = Path(path)
    data = png_bytes(fig, dpi)  # rendered before any folder exists, so a failed drawing leaves nothing behind
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_atomic(data, path)


def finish(fig: Figure, path: str | Path | None = None) -> Figure:
    """The last line of every drawing function: save when a path is given, return the figure either way."""
    if path is not None:
        save_png(fig, path)
    return fig


def show(*items: Figure | str | Path) -> None:
    """Display figures, and PNG or GIF files (an animation plays), inline in a Jupyter notebook, in order."""
    try:
        from IPython.display import Image as IPythonImage
        from IPython.display import display
    except ImportError:
        raise ConfigError(
            "show() displays in a Jupyter notebook and needs IPython (pip install ipykernel); "
            "elsewhere write the figure with save_png(fig, path)"
        ) from None
    for item in items:
        if isinstance(item, Figure):
            display(IPythonImage(data=png_bytes(item), format="png"))
        elif Path(item).suffix.lower() in (".png", ".gif"):
            display(IPythonImage(filename=str(item)))
        else:
            raise ConfigError(f"show() takes figures and .png or .gif files; got {item!r}")


def _to_rgb(cell: np.ndarray, cmap: Colormap, vmin: float | None, vmax: float | None) -> np.ndarray:
    """One cell as (h, w, 3) uint8. uint8 cells are pixels, shown as they are (grey or colour); others are scaled
    to vmin..vmax (None: the cell's own min..max, a constant cell mid-scale), (h, w, 3) as colour and (h, w)
    through `cmap`, NaN drawn white."""
    if cell.dtype == np.uint8:
        return np.repeat(cell[..., None], 3, axis=2) if cell.ndim == 2 else np.repeat(cell, 3 // cell.shape[2], 2)
    a = np.asarray(cell, dtype=np.float64)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    finite = a[np.isfinite(a)]
    lo = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
    hi = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
    unit = np.full_like(a, 0.5) if hi - lo < 1e-12 else (a - lo) / (hi - lo)
    if a.ndim == 3:
        rgb = np.clip(np.nan_to_num(unit, nan=1.0), 0.0, 1.0)
    else:
        rgb = cmap(np.ma.masked_invalid(np.clip(unit, 0.0, 1.0)))[..., :3]
    return np.round(rgb * 255).astype(np.uint8)


def _fit(rgb: np.ndarray, slot: tuple[int, int]) -> np.ndarray:
    """Scale a cell into a slot keeping its aspect: whole-number upscaling (sharp pixels), area averaging down."""
    h, w = rgb.shape[:2]
    scale = min(slot[0] / h, slot[1] / w)
    if scale >= 1:
        k = int(scale)
        return np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def image_grid(
    cells: Sequence[np.ndarray | None],
    cols: int,
    *,
    cmap: str = "gray",
    vmin: float | None = None,
    vmax: float | None = None,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    cell_inches: float = 0.9,
    fontsize: float = 7,
    max_slot: int = 96,
    max_inches: float = 16.0,
    path: str | Path | None = None,
) -> Figure:
    """Images in rows of `cols`, drawn as one mosaic on one axes (thousands of cells take as long as one).

    `cells`: uint8 pixels (h, w) or (h, w, 3) as they are; other (h, w) arrays through `cmap` and (h, w, 3) as
    colour, scaled to vmin..vmax, or with either left None each to its own range; None leaves a slot blank.
    Every slot is as large as the largest cell
    (at most `max_slot` pixels); smaller cells are scaled up by whole pixels. `titles` go above each cell (a
    line each per newline), `row_labels` left of each row.
    """
    if cols < 1 or not len(cells):
        raise ValueError(f"image_grid needs at least one cell and one column; got {len(cells)} cells, {cols} columns")
    rows = -(-len(cells) // cols)
    cells = [None if c is None else np.asarray(c) for c in cells]
    present = [c for c in cells if c is not None]
    slot = (min(max(c.shape[0] for c in present), max_slot), min(max(c.shape[1] for c in present), max_slot))
    gap = max(1, max(slot) // 12)
    inch_per_px = min(
        cell_inches / max(slot), max_inches / (cols * (slot[1] + gap)), max_inches / (rows * (slot[0] + gap))
    )  # the titles' band may add a little to the height
    lines = max((t.count("\n") + 1 for t in titles or [] if t), default=0)
    band = int(np.ceil(lines * fontsize * 1.3 / 72 / inch_per_px)) if lines else 0  # room for the titles, in pixels
    pitch_h, pitch_w = slot[0] + gap + band, slot[1] + gap
    mosaic = np.full((rows * pitch_h - gap, cols * pitch_w - gap, 3), 255, dtype=np.uint8)
    colours = colormaps[cmap].with_extremes(bad="white")
    for i, cell in enumerate(cells):
        if cell is None:
            continue
        img = _fit(_to_rgb(cell, colours, vmin, vmax), slot)
        r, c = divmod(i, cols)
        top = r * pitch_h + band + (slot[0] - img.shape[0]) // 2
        left = c * pitch_w + (slot[1] - img.shape[1]) // 2
        mosaic[top : top + img.shape[0], left : left + img.shape[1]] = img

    height_in = mosaic.shape[0] * inch_per_px
    fig = new_figure(mosaic.shape[1] * inch_per_px + 0.4, height_in + (0.5 if title else 0.2) + (0.3 if xlabel else 0))
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.96 * height_in / fig.get_figheight()))
    ax.imshow(mosaic, interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    for i, text in enumerate(titles or []):
        if text:
            r, c = divmod(i, cols)
            ax.text(c * pitch_w - 0.5, r * pitch_h + band - 1, text, fontsize=fontsize, ha="left", va="bottom")
    for r, text in enumerate(row_labels or []):
        ax.text(-gap, r * pitch_h + band + slot[0] / 2, text, fontsize=fontsize + 1, ha="right", va="center")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    return finish(fig, path)
