"""`cnnlab viz conv --html`: one self-contained page where the convolution window moves, step by step or playing,
over an image's channels, in the spirit of CS231n's convolution demo (cs231n.github.io/convolutional-networks).

Every output number on the page was computed here, by `conv2d_by_hand` and `max_pool_by_hand` (the code the PNG
slides use), for every stride and padding the page offers, and embedded as JSON; the page's script only looks
them up, and multiplies the window by the filter to show the products. CSS, script and images (data: URIs) are
inline and a Content-Security-Policy forbids any fetch, so the page works offline and can be mailed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError
from ..files import save_atomic
from .conv import (
    LEVELS,
    as_array,
    color_filters,
    conv2d_by_hand,
    integer_scale,
    max_pool_by_hand,
    numeric_example,
    prepare_rgb,
    to_levels,
)

__all__ = ["STRIDES", "PADDINGS", "POOL", "conv_page_data", "conv_page_html", "write_conv_page"]

STRIDES = (1, 2, 3)
PADDINGS = (0, 1, 2)
POOL = 2  # 2x2 windows, stride 2: the pooling every classic convnet uses
PAGE_SIZES = range(4, 13)  # image side: 4 leaves a 2x2 map to pool at stride 1, 12 still shows every number
CHANNELS = ("red", "green", "blue")


def _png_uri(rgb: np.ndarray, scale: int = 1) -> str:
    """(H, W, 3) floats in [0, 1] as a PNG data: URI, each pixel drawn as a scale x scale block."""
    pixels = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _results(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> dict:
    """Every output the page can show: for each stride and padding, the maps, their ReLU and its 2x2 max pooling
    (None where a map is smaller than one pooling window)."""
    results = {}
    for s in STRIDES:
        for p in PADDINGS:
            out = conv2d_by_hand(x, weight, bias, stride=s, padding=p)
            relu = np.maximum(out, 0)
            pool = None
            if min(relu.shape[1:]) >= POOL:
                values, indices = max_pool_by_hand(relu, POOL, POOL)
                pool = {"values": values.tolist(), "indices": indices.tolist()}
            results[f"s{s}p{p}"] = {"out": out.tolist(), "relu": relu.tolist(), "pool": pool}
    return results


def _example(
    key: str,
    name: str,
    note: str,
    x,
    weight,
    bias,
    filter_names: list[str],
    default: tuple[int, int],
    scales: list[int] | None = None,
    images: dict | None = None,
) -> dict:
    x, weight, bias = as_array(x), as_array(weight), as_array(bias)
    return {
        "key": key,
        "name": name,
        "note": note,
        "x": x.tolist(),
        "weight": weight.tolist(),
        "bias": bias.tolist(),
        "channels": list(CHANNELS[: x.shape[0]]),
        "filters": filter_names,
        "scales": scales or [1] * len(filter_names),
        "default": {"stride": default[0], "padding": default[1]},
        "images": images or {},
        "results": _results(x, weight, bias),
    }


def conv_page_data(image=None, filters: int = 2, size: int = 7) -> dict:
    """What the page shows, as plain lists: the image (`None`: the built-in scene; a path; or an array) shrunk to
    size x size and rounded to the levels 0..9 under the first `filters` filters of the colour bank (in whole
    numbers: each times its smallest integer scale), and CS231n's 5x5x3 example, with all their outputs."""
    names, bank = color_filters(filters)  # a bad count fails before any work starts
    if size not in PAGE_SIZES:
        raise ConfigError(
            f"the page shows every number, so the image side must be {PAGE_SIZES.start}.."
            f"{PAGE_SIZES.stop - 1} pixels; got {size}"
        )
    rgb = prepare_rgb(image, size)
    preview = prepare_rgb(image, 96)  # large enough to recognise the picture beside its numbers
    levels = to_levels(rgb)
    scales = [integer_scale(w) or 1 for w in bank]
    weight = np.round(bank * np.array(scales)[:, None, None, None]).astype(np.int64)
    source = (
        Path(image).name if isinstance(image, (str, Path)) else "the built-in scene" if image is None else "your image"
    )
    picture = _example(
        "image",
        f"{source} ({size}x{size}x3, levels 0-{LEVELS - 1})",
        f"{source}, shrunk to {size}x{size} pixels and rounded to {LEVELS} levels per channel, so that every product "
        "is a small whole number; the filters are the slides' colour filters in whole numbers.",
        np.moveaxis(levels, 2, 0),
        weight,
        np.zeros(len(names), dtype=np.int64),
        names,
        (1, 1),
        scales,
        {"preview": _png_uri(preview), "pixels": _png_uri(levels / (LEVELS - 1), scale=96 // size)},
    )
    ex = numeric_example()
    cs231n = _example(
        "cs231n",
        "CS231n's example (5x5x3, values 0-2)",
        "CS231n's convolution demo: a 5x5x3 input of 0..2, two 3x3x3 filters of -1..1 with biases 1 and 0; "
        "their setting is stride 2 and zero padding 1, giving a 3x3x2 output.",
        ex.x,
        ex.weight,
        ex.bias,
        ["w0", "w1"],
        (ex.stride, ex.padding),
    )
    return {
        "examples": [picture, cs231n],
        "strides": list(STRIDES),
        "paddings": list(PADDINGS),
        "kernel": 3,
        "pool": POOL,
    }


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def conv_page_html(data: dict) -> str:
    """The page around `data` (from `conv_page_data`): markup, inline CSS and script, the data as JSON."""
    # '<' escaped so that no string in the data can close the script element
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    options = "".join(f'<option value="{i}">{html.escape(e["name"])}</option>' for i, e in enumerate(data["examples"]))
    strides = "".join(f'<option value="{s}">{s}</option>' for s in data["strides"])
    paddings = "".join(f'<option value="{p}">{p}</option>' for p in data["paddings"])
    parts = {
        "CSS": _asset("conv_page.css"),
        "SCRIPT": _asset("conv_page.js"),
        "EXAMPLES": options,
        "STRIDES": strides,
        "PADDINGS": paddings,
        "DATA": payload,
    }
    # one pass, so that nothing inserted (a file name, say) is itself searched for placeholders
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda m: parts[m.group(1)], _asset("conv_page.html"))


def write_conv_page(path: str | Path, image=None, filters: int = 2, size: int = 7) -> Path:
    """Write the interactive convolution page to `path` (arguments as `conv_page_data`); returns the path."""
    page = conv_page_html(conv_page_data(image, filters, size))  # every check runs before a folder is made
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_atomic(page.encode("utf-8"), path)
