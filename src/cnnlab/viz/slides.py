"""Convolution, shown: the slides' animations and figures, drawn from the numbers in `conv.py`.

Slide (a): a grey image and one 3x3 filter, the window sliding and the output map filling in.
Slide (b): a colour image and a bank of 3x3x3 filters, one output map per filter.
Slide (c): CS231n's worked example (Karpathy et al., cs231n.github.io/convolutional-networks) as grids of numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.patches import Rectangle

from ..errors import ConfigError
from . import _grid
from .conv import (
    DEFAULT_SIZE,
    VERTICAL_EDGE,
    NumericExample,
    as_array,
    color_filters,
    conv2d_by_hand,
    integer_scale,
    numeric_example,
    prepare_rgb,
    to_gray,
    to_levels,
)
from .figure import finish, new_figure

__all__ = ["plot_numeric_example", "animate_conv_gray", "animate_conv_color", "render_conv"]


def plot_numeric_example(
    path: str | Path | None = None,
    example: NumericExample | None = None,
    seed: int = 0,
    position: tuple[int, int] = (0, 0),
    filter_index: int = 0,
) -> Figure:
    """The worked example as grids of numbers: padded input slices, both filters, biases, output slices.

    One output cell (`position` of map `filter_index`) is worked through: its window, filter and result are
    outlined and the sum is written out below.
    """
    ex = example or numeric_example(seed)
    C, K = ex.x.shape[0], ex.weight.shape[0]
    if K > C:
        raise ConfigError(f"the figure has one row per input channel, so at most {C} filters fit; got {K}")
    p, s = ex.padding, ex.stride
    kh, kw = ex.weight.shape[2:]
    i, j = position
    xp = np.pad(ex.x, ((0, 0), (p, p), (p, p))).astype(float)
    pad_mask = np.ones(xp.shape[1:], dtype=bool)
    pad_mask[p : p + ex.x.shape[1], p : p + ex.x.shape[2]] = False

    cmap_in = colormaps["cividis"].with_extremes(bad=_grid.PAD_COLOUR)
    cmap_signed = colormaps["RdBu_r"]
    norm_in = Normalize(0, max(int(ex.x.max()), 1))
    norm_w = _grid.symmetric_norm(ex.weight)
    norm_out = _grid.symmetric_norm(ex.out)

    fig = new_figure(2.9 * (2 + K) + 1.6, 2.9 * C + 1.0, dpi=100, layout="constrained")
    # every panel is square and as tall as its row, so the grids get equal widths (bias cells: smaller squares)
    gs = fig.add_gridspec(C, 2 + 2 * K, width_ratios=[1.0] * (1 + K) + [0.45] * K + [1.0])
    for c in range(C):
        ax = fig.add_subplot(gs[c, 0])
        shown = np.where(pad_mask, np.nan, xp[c])  # padding cells blank and hatched, their zeros written in grey
        labels = np.vectorize(_grid.fmt_number)(xp[c])
        _grid.draw_grid(ax, shown, cmap_in, norm_in, 10, origin=(-p, -p), labels=labels)
        _grid.hatch_padding(ax, ex.x.shape[1], ex.x.shape[2], p)
        _grid.outline(ax, i * s - p, j * s - p, kh, kw)
        ax.set_title(f"input x[:, :, {c}] (padded)", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if c == C - 1:
            ax.set_xlabel(f"{ex.x.shape[1]}x{ex.x.shape[2]}x{C} input, zero padding {p} (hatched)", fontsize=9)
        for k in range(K):
            ax = fig.add_subplot(gs[c, 1 + k])
            _grid.draw_grid(ax, ex.weight[k, c].astype(float), cmap_signed, norm_w, 11)
            if k == filter_index:
                _grid.outline(ax, 0, 0, kh, kw)
            ax.set_title(f"filter w{k}[:, :, {c}]", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    for k in range(K):
        ax = fig.add_subplot(gs[0, 1 + K + k])
        _grid.draw_grid(ax, np.array([[float(ex.bias[k])]]), cmap_signed, _grid.symmetric_norm(ex.bias), 11)
        ax.set_title(f"bias b{k}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax = fig.add_subplot(gs[k, 1 + 2 * K])
        _grid.draw_grid(ax, ex.out[k].astype(float), cmap_signed, norm_out, 11)
        if k == filter_index:
            _grid.outline(ax, i, j, 1, 1)
        ax.set_title(f"output o[:, :, {k}]", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for r in range(1, C):  # empty bias cells below the biases
        for k in range(K):
            fig.add_subplot(gs[r, 1 + K + k]).axis("off")

    k = filter_index
    per_channel = [int((xp[c, i * s : i * s + kh, j * s : j * s + kw] * ex.weight[k, c]).sum()) for c in range(C)]
    sums = " + ".join(f"({v})" for v in per_channel)
    fig.suptitle(
        f"Convolution by hand: {ex.x.shape[1]}x{ex.x.shape[2]}x{C} input, {K} filters "
        f"{kh}x{kw}x{C}, stride {s}, zero padding {p} -> {ex.out.shape[1]}x{ex.out.shape[2]}x{K} output",
        fontsize=12,
    )
    fig.text(
        0.5,
        -0.01,
        f"o[{i},{j},{k}] = sum over the {C} channels of (window * w{k}) + b{k} = {sums} "
        f"+ ({ex.bias[k]}) = {ex.out[k, i, j]}    (outlined in orange)",
        ha="center",
        va="top",
        fontsize=11,
        family="monospace",
    )
    return finish(fig, path)


# ---------------------------------------------------------------------------------------------- animations


def _frame_positions(Ho: int, Wo: int, max_frames: int) -> list[int]:
    """Flat output indices shown, in raster order: the first row one step at a time, so the slide is visible,
    then evenly spaced jumps to the last position, so the GIF stays within `max_frames`."""
    if max_frames < 2:
        raise ConfigError(f"max_frames must be at least 2; got {max_frames}")
    total = Ho * Wo
    if total <= max_frames:
        return list(range(total))
    first = list(range(min(Wo, max_frames // 2)))
    rest = np.linspace(first[-1] + 1, total - 1, max_frames - len(first))
    return first + sorted(set(np.round(rest).astype(int).tolist()))


def _filled(out: np.ndarray, upto: int) -> np.ndarray:
    """`out` with every position after flat index `upto` (raster order) not computed yet: NaN, drawn blank."""
    shown = np.full(out.shape, np.nan)
    flat = out.reshape(out.shape[0], -1) if out.ndim == 3 else out.reshape(1, -1)
    shown.reshape(flat.shape)[:, : upto + 1] = flat[:, : upto + 1]
    return shown


def _term(w: float, x: float) -> str:
    ws = _grid.fmt_number(w)
    return f"({ws})·{_grid.fmt_number(x)}" if w < 0 else f"{ws}·{_grid.fmt_number(x)}"


def _check_plane(a: np.ndarray, what: str, ndim: int, shape_hint: str) -> np.ndarray:
    if a.ndim != ndim:
        raise ConfigError(f"{what} must be {shape_hint}; got shape {a.shape}")
    return a


def _frame_input(ax, H: int, W: int, p: int, kh: int, kw: int, title: str):
    """Hatch the padding, add the sliding-window outline (returned, to be moved per frame), ticks and labels."""
    _grid.hatch_padding(ax, H, W, p)
    window = _grid.outline(ax, -p, -p, kh, kw, lw=3, animated=True)
    _grid.grid_ticks(ax, H + 2 * p, W + 2 * p, origin=(-p, -p))
    ax.set(xlabel="column", ylabel="row")
    ax.set_title(title, fontsize=10)
    return window


def _write_animation(
    show: Callable[[int], np.ndarray],
    Ho: int,
    Wo: int,
    max_frames: int,
    gif_path: str | Path | None,
    png_path: str | Path | None,
) -> None:
    """The ending both slides share: the frames as a looping GIF, and as a still PNG the window at the map's
    centre with half the map computed. Either file is skipped when its path is None."""
    if gif_path is not None:
        _grid.write_gif([show(f) for f in _frame_positions(Ho, Wo, max_frames)], Path(gif_path))
    if png_path is not None:
        _grid.write_png(show((Ho // 2) * Wo + Wo // 2), Path(png_path))


def animate_conv_gray(
    image,
    kernel,
    gif_path: str | Path | None,
    png_path: str | Path | None = None,
    max_frames: int = 40,
    padding: int = 1,
    stride: int = 1,
    filter_name: str = "vertical edge",
) -> np.ndarray:
    """Slide (a): a grey image (H, W) and one filter (kh, kw); each frame outlines the current window on the
    (padded) input, and the output map fills in. Writes the GIF and a still PNG (window at the map's centre,
    half the map computed), each only when given its path. Returns the output map (Ho, Wo)."""
    image = _check_plane(as_array(image), "a grey image", 2, "(H, W)")
    kernel = _check_plane(as_array(kernel), "the filter", 2, "(kh, kw)")
    out = conv2d_by_hand(image[None], kernel[None, None], stride=stride, padding=padding)[0]
    H, W = image.shape
    kh, kw = kernel.shape
    Ho, Wo = out.shape
    p, s = padding, stride
    xp = np.pad(image.astype(float), p)

    gray_cmap = colormaps["gray"].with_extremes(bad=_grid.PAD_COLOUR)
    signed = colormaps["RdBu_r"].with_extremes(bad="white")
    norm_in = Normalize(float(min(image.min(), 0)), float(max(image.max(), 1)))
    norm_k, norm_out = _grid.symmetric_norm(kernel), _grid.symmetric_norm(out)
    cell = 0.3  # inches per cell, the same in every panel so the filter is visibly the window's size
    fig = new_figure(cell * (W + 2 * p + kw + Wo) + 3.4, cell * (H + 2 * p) + 0.9, dpi=80, layout="constrained")
    gs = fig.add_gridspec(1, 3, width_ratios=[W + 2 * p, kw + 2, Wo])

    ax_in = fig.add_subplot(gs[0])
    shown = xp.copy()
    if p:
        shown[:p], shown[-p:], shown[:, :p], shown[:, -p:] = np.nan, np.nan, np.nan, np.nan
    _grid.draw_grid(ax_in, shown, gray_cmap, norm_in, 7, origin=(-p, -p), labels=np.vectorize(_grid.fmt_number)(xp))
    window = _frame_input(ax_in, H, W, p, kh, kw, f"input {H}x{W}, grey levels, zero padding {p} (hatched)")

    ax_k = fig.add_subplot(gs[1])
    _grid.draw_grid(ax_k, kernel.astype(float), signed, norm_k, 9)
    _grid.outline(ax_k, 0, 0, kh, kw, lw=3)
    ax_k.set_xticks([])
    ax_k.set_yticks([])
    ax_k.set_title(f"{kh}x{kw} filter\n({filter_name})", fontsize=10)

    ax_out = fig.add_subplot(gs[2])
    im_out = ax_out.imshow(np.full(out.shape, np.nan), cmap=signed, norm=norm_out)  # blank: the map's frame
    # every output cell as its own patch and number, drawn only once it is computed
    cells = np.empty(out.shape, dtype=object)
    for (r, c), v in np.ndenumerate(out):
        cells[r, c] = (
            Rectangle((c - 0.5, r - 0.5), 1, 1, facecolor=signed(norm_out(v)), animated=True),
            ax_out.text(
                c,
                r,
                _grid.fmt_number(v),
                ha="center",
                va="center",
                fontsize=7,
                animated=True,
                color=_grid.text_colour(signed, norm_out, v),
            ),
        )
        ax_out.add_patch(cells[r, c][0])
    current = _grid.outline(ax_out, 0, 0, 1, 1, lw=2.5, animated=True)
    _grid.grid_ticks(ax_out, Ho, Wo)
    ax_out.set(xlabel="column", ylabel="row")
    fig.colorbar(im_out, ax=ax_out, fraction=0.046, label="output value (blank: not computed yet)")
    title_out = ax_out.set_title(f"output {Ho}x{Wo}: {out.size} of {out.size} computed", fontsize=10)
    equation = fig.text(0.5, 0.005, "", ha="center", va="bottom", fontsize=9, family="monospace", animated=True)
    fig.suptitle(
        f"Convolution, one window at a time: {kh}x{kw} filter, stride {s}, zero padding {p}: "
        f"{H}x{W} in -> {Ho}x{Wo} out",
        fontsize=12,
    )
    engine = fig.get_layout_engine()
    assert isinstance(engine, ConstrainedLayoutEngine)  # new_figure(layout="constrained") above
    engine.set(h_pad=0.25)  # room for the equation line below the panels
    _grid.freeze_layout(fig)  # with the longest title in place; then panels stay put as titles change
    title_out.set_animated(True)
    blit = _grid.Blitter(fig)
    blank = blit.copy(ax_out.bbox)
    state = {"upto": -1, "region": blank}  # output cells drawn so far, and the output panel with them

    def show(flat: int) -> np.ndarray:
        i, j = divmod(flat, Wo)
        blit.restore()
        if flat < state["upto"]:  # going back: start the output panel from blank again
            state.update(upto=-1, region=blank)
        blit.restore(state["region"])
        for q in range(state["upto"] + 1, flat + 1):  # only the newly computed cells are drawn
            blit.draw(*cells[divmod(q, Wo)])
        state.update(upto=flat, region=blit.copy(ax_out.bbox))
        window.set_xy((j * s - p - 0.5, i * s - p - 0.5))
        current.set_xy((j - 0.5, i - 0.5))
        title_out.set_text(f"output {Ho}x{Wo}: {flat + 1} of {out.size} computed")
        patch = xp[i * s : i * s + kh, j * s : j * s + kw]
        if kh * kw <= 9:
            terms = " + ".join(_term(w, x) for w, x in zip(kernel.ravel(), patch.ravel()))
            equation.set_text(f"out[{i},{j}] = {terms} = {_grid.fmt_number(out[i, j])}")
        else:  # 25 products would not fit on one line
            equation.set_text(f"out[{i},{j}] = sum of window * filter = {_grid.fmt_number(out[i, j])}")
        blit.draw(window, current, title_out, equation)
        return blit.rgb()

    _write_animation(show, Ho, Wo, max_frames, gif_path, png_path)
    return out


def _channel_strip(planes: np.ndarray) -> np.ndarray:
    """(3, kh, kw) -> (kh, 3*kw + 2): the channels side by side with a blank (NaN) column between them."""
    gap = np.full((planes.shape[1], 1), np.nan)
    return np.concatenate([planes[0], gap, planes[1], gap, planes[2]], axis=1).astype(float)


def animate_conv_color(
    image_rgb,
    filters,
    gif_path: str | Path | None,
    png_path: str | Path | None = None,
    max_frames: int = 40,
    padding: int = 1,
    stride: int = 1,
    names: list[str] | None = None,
) -> np.ndarray:
    """Slide (b): a colour image (H, W, 3) and N filters (N, 3, kh, kw); each frame outlines the window on the
    input, prints its 3 x kh x kw numbers, and the N output maps fill in. Returns the maps (N, Ho, Wo)."""
    image = _check_plane(as_array(image_rgb), "a colour image", 3, "(H, W, 3)")
    filters = _check_plane(as_array(filters), "the filters", 4, "(N, 3, kh, kw)")
    if image.shape[2] != 3 or filters.shape[1] != 3:
        raise ConfigError(
            f"slide (b) needs an (H, W, 3) image and (N, 3, kh, kw) filters; got {image.shape} and {filters.shape}"
        )
    N, _, kh, kw = filters.shape
    names = list(names) if names is not None else [f"filter {k + 1}" for k in range(N)]
    x = np.moveaxis(image, 2, 0)  # (H, W, 3) -> (3, H, W): channels first, as conv layers take them
    out = conv2d_by_hand(x, filters, stride=stride, padding=padding)
    H, W = image.shape[:2]
    Ho, Wo = out.shape[1:]
    p, s = padding, stride
    xp = np.pad(x.astype(float), ((0, 0), (p, p), (p, p)))

    lo, hi = float(image.min()), float(image.max())
    rgb = np.ones((H + 2 * p, W + 2 * p, 3))  # padding shown white and hatched
    rgb[p : p + H, p : p + W] = (image - lo) / ((hi - lo) or 1.0)
    signed = colormaps["RdBu_r"].with_extremes(bad="white")
    gray = colormaps["gray"].with_extremes(bad="white")
    cols = max(N, 4)
    fig = new_figure(2.1 * cols + 0.6, 7.6, dpi=80, layout="constrained")
    gs = fig.add_gridspec(3, cols, height_ratios=[3.0, 1.0, 2.2])
    spare = 1.05 * (cols - 4) + 0.01  # with more than 4 filters, centre the input and window, not stretch them
    top = gs[0, :].subgridspec(1, 4, width_ratios=[spare, 4.2, 4.2, spare])
    fig.add_subplot(top[0]).axis("off")
    fig.add_subplot(top[3]).axis("off")

    ax_in = fig.add_subplot(top[1])
    ax_in.imshow(rgb, interpolation="nearest", extent=(-p - 0.5, W + p - 0.5, H + p - 0.5, -p - 0.5))
    window = _frame_input(ax_in, H, W, p, kh, kw, f"input {H}x{W}x3, zero padding {p} (hatched)")

    ax_win = fig.add_subplot(top[2])
    strip = _channel_strip(xp[:, :kh, :kw])
    win_norm = Normalize(min(lo, 0.0), max(hi, 1.0))
    im_win, win_texts = _grid.draw_grid(ax_win, strip, gray, win_norm, 10, animated=True)
    for c in range(3):  # frame each channel's block: white (level 9) cells would otherwise merge with the gaps
        _grid.outline(ax_win, 0, c * (kw + 1), kh, kw, colour="#555555", lw=1)
    ax_win.set_xticks([(kw - 1) / 2 + c * (kw + 1) for c in range(3)], ["red", "green", "blue"])
    ax_win.set_yticks([])
    ax_win.set_title(f"the window: {3 * kh * kw} numbers ({kh}x{kw} in each of 3 channels)", fontsize=10)
    ax_win.set_xlabel(
        f"each output number = sum of these {3 * kh * kw} numbers\ntimes one filter's {3 * kh * kw} weights", fontsize=9
    )

    out_images, currents, out_titles = [], [], []
    for k in range(N):
        ax = fig.add_subplot(gs[1, k])
        d = integer_scale(filters[k])
        weights = filters[k] * d if d else filters[k]
        _grid.draw_grid(ax, _channel_strip(weights), signed, _grid.symmetric_norm(weights), 6.5)
        ax.set_xticks([(kw - 1) / 2 + c * (kw + 1) for c in range(3)], ["R", "G", "B"], fontsize=7)
        ax.set_yticks([])
        ax.set_title(f"{k + 1}. {names[k]}" + (f"  (x 1/{d})" if d > 1 else ""), fontsize=9)

        ax = fig.add_subplot(gs[2, k])
        out_images.append(
            ax.imshow(
                np.full((Ho, Wo), np.nan),
                cmap=signed,
                norm=_grid.symmetric_norm(out[k]),
                interpolation="nearest",
                animated=True,
            )
        )
        currents.append(_grid.outline(ax, 0, 0, 1, 1, lw=2, animated=True))
        out_titles.append(ax.set_title(f"{names[k]}: -00.0", fontsize=9))
        _grid.grid_ticks(ax, Ho, Wo)
        ax.set_xlabel(f"output map {k + 1} ({Ho}x{Wo})", fontsize=8)
    for k in range(N, cols):  # fewer than 4 filters: keep the panels their usual size
        fig.add_subplot(gs[1, k]).axis("off")
        fig.add_subplot(gs[2, k]).axis("off")
    fig.suptitle(
        f"{N} filter{'s' if N > 1 else ''} of {kh}x{kw}x3 on a colour image, stride {s}: "
        f"one output map per filter\n(maps: red > 0 > blue, each on its own scale)",
        fontsize=12,
    )
    _grid.freeze_layout(fig)
    for t in out_titles:
        t.set_animated(True)
    blit = _grid.Blitter(fig)

    def show(flat: int) -> np.ndarray:
        i, j = divmod(flat, Wo)
        blit.restore()
        window.set_xy((j * s - p - 0.5, i * s - p - 0.5))
        patch = _channel_strip(xp[:, i * s : i * s + kh, j * s : j * s + kw])
        im_win.set_data(patch)
        blit.draw(window, im_win)
        for (r, c), t in np.ndenumerate(win_texts):
            t.set_text(_grid.fmt_number(patch[r, c]))
            t.set_color(_grid.text_colour(gray, win_norm, patch[r, c]))
            blit.draw(t)
        filled = _filled(out, flat)
        for k in range(N):
            out_images[k].set_data(filled[k])
            currents[k].set_xy((j - 0.5, i - 0.5))
            out_titles[k].set_text(f"{names[k]}: {_grid.fmt_number(out[k, i, j])}")
            blit.draw(out_images[k], currents[k], out_titles[k])
        return blit.rgb()

    _write_animation(show, Ho, Wo, max_frames, gif_path, png_path)
    return out


# ---------------------------------------------------------------------------------------------- entry point


def render_conv(
    out_dir: str | Path, image=None, filters: int = 5, size: int = DEFAULT_SIZE, max_frames: int = 40
) -> list[Path]:
    """The convolution slides, into `out_dir`: conv_gray.gif/.png (a), conv_color.gif/.png (b), conv_numeric.png.

    `image`: None (a synthetic scene), an image file, or an array; shrunk to `size` x `size` and rounded to the
    levels 0..9. `filters`: how many of the colour bank's filters slide (b) shows (1..8).
    """
    names, bank = color_filters(filters)  # a bad count fails before any work starts
    if not 3 <= size <= 32:
        raise ConfigError(f"size must be 3..32 pixels so the numbers stay readable; got {size}")
    rgb = prepare_rgb(image, size)  # an unreadable image fails before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        out_dir / n for n in ("conv_gray.gif", "conv_gray.png", "conv_color.gif", "conv_color.png", "conv_numeric.png")
    ]
    animate_conv_gray(to_levels(to_gray(rgb)), VERTICAL_EDGE, paths[0], paths[1], max_frames=max_frames)
    animate_conv_color(to_levels(rgb), bank, paths[2], paths[3], max_frames=max_frames, names=names)
    plot_numeric_example(paths[4])
    return paths
