"""Convolution and pooling by hand, as numbers: the loops, the classic worked example, the filters and the images
the slides and the interactive page show. No drawing here (the slides are in `slides.py`, the page in `conv_page.py`).

The worked example follows CS231n's convolution demo (Karpathy et al., cs231n.github.io/convolutional-networks).
Images are shrunk to about 16x16 and their values rounded to the levels 0..9, so that every number on a slide
is exact and a student can check any output cell by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.images import open_image
from ..errors import ConfigError, ImageError

__all__ = [
    "as_array",
    "conv2d_by_hand",
    "max_pool_by_hand",
    "conv_macs",
    "integer_scale",
    "NumericExample",
    "numeric_example",
    "default_image",
    "load_image",
    "prepare_rgb",
    "to_gray",
    "to_levels",
    "VERTICAL_EDGE",
    "color_filters",
    "COLOR_FILTER_NAMES",
    "edge_feature_map",
    "LEVELS",
    "DEFAULT_SIZE",
    "MAX_COLOR_FILTERS",
]

# Sobel's vertical-edge filter: positive where brightness rises from left to right, negative where it falls,
# zero on flat regions. The 2s weight the centre row, a little smoothing along the edge.
VERTICAL_EDGE = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])

LEVELS = 10  # grey levels 0..9: one digit per cell keeps a 16x16 grid of numbers readable
DEFAULT_SIZE = 16
MAX_COLOR_FILTERS = 8


def as_array(a) -> np.ndarray:
    """numpy arrays, nested lists and torch tensors (detached, on the CPU) alike."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def conv2d_by_hand(x, weight, bias=None, stride: int = 1, padding: int = 0) -> np.ndarray:
    """(C, H, W) input, (K, C, kh, kw) filters -> (K, Ho, Wo), one nested sum per output number:

        out[k, i, j] = bias[k] + sum over c, u, v of  x_padded[c, i*stride + u, j*stride + v] * weight[k, c, u, v]

    As in every deep-learning library (and `torch.nn.functional.conv2d`) the filter is not flipped: strictly a
    cross-correlation. Written as plain loops to be read, not run on large inputs (K*Ho*Wo*C*kh*kw Python steps).
    """
    x, weight = as_array(x), as_array(weight)
    if x.ndim != 3 or weight.ndim != 4:
        raise ConfigError(f"expected x as (C, H, W) and weight as (K, C, kh, kw); got {x.shape} and {weight.shape}")
    C, H, W = x.shape
    K, C_w, kh, kw = weight.shape
    if C_w != C:
        raise ConfigError(f"each filter must span all {C} input channels; weight has {C_w} (shape {weight.shape})")
    if stride < 1 or padding < 0:
        raise ConfigError(f"stride must be >= 1 and padding >= 0; got stride={stride}, padding={padding}")
    bias = np.zeros(K, dtype=weight.dtype) if bias is None else as_array(bias)
    if bias.shape != (K,):
        raise ConfigError(f"bias must hold one number per filter ({K}); got shape {bias.shape}")

    # Zero padding: `padding` rows and columns of zeros on every side, so border pixels get full windows too
    # and a 3x3 filter with padding 1 keeps the size (H x W in, H x W out at stride 1).
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding)))
    # The last window must fit inside the padded input: (H + 2p - kh) // stride further steps after the first.
    Ho = (H + 2 * padding - kh) // stride + 1
    Wo = (W + 2 * padding - kw) // stride + 1
    if Ho < 1 or Wo < 1:
        raise ConfigError(f"a {kh}x{kw} filter does not fit a {H}x{W} input with padding {padding}")

    # Integers stay integers (the worked example's answers are exact); int64 so no product can overflow.
    out = np.zeros((K, Ho, Wo), dtype=np.result_type(x.dtype, weight.dtype, bias.dtype, np.int64))
    for k in range(K):  # one output map per filter
        for i in range(Ho):  # output row i: its window starts at padded input row i*stride
            for j in range(Wo):  # output column j: window starts at padded column j*stride
                total = bias[k]
                for c in range(C):  # a filter is as deep as the input: it sums over every channel
                    for u in range(kh):  # and over every row and column of its window
                        for v in range(kw):
                            total += xp[c, i * stride + u, j * stride + v] * weight[k, c, u, v]
                out[k, i, j] = total
    return out


def max_pool_by_hand(x, kernel: int = 2, stride: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) -> the maximum of each kernel x kernel window, (C, Ho, Wo), and where it was: the flat index
    row * W + column within its channel, as `torch.nn.functional.max_pool2d(..., return_indices=True)` gives.

    On ties the first maximum in reading order wins, as in PyTorch's CPU kernel (ReLU maps have many zeros).
    """
    x = as_array(x)
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
                window = x[c, r0 : r0 + kernel, c0 : c0 + kernel]
                u, v = divmod(int(np.argmax(window)), kernel)  # argmax: the first maximum in reading order
                values[c, i, j] = window[u, v]
                indices[c, i, j] = (r0 + u) * W + (c0 + v)
    return values, indices


def conv_macs(height: int, width: int, c_in: int, c_out: int, kernel: int = 3) -> int:
    """Multiply-accumulates of a kernel x kernel conv with 'same' padding and stride 1 on a height x width input:
    each of the height*width*c_out outputs sums kernel*kernel*c_in products."""
    return height * width * c_out * c_in * kernel * kernel


def integer_scale(weights: np.ndarray, largest: int = 64) -> int:
    """Smallest d <= `largest` with d * weights all integers (1/27 box blur -> 27); 0 when there is none."""
    for d in range(1, largest + 1):
        scaled = weights * d
        if np.allclose(scaled, np.round(scaled), atol=1e-6):
            return d
    return 0


# ---------------------------------------------------------------------------------------------- worked example


@dataclass(frozen=True)
class NumericExample:
    """Input (C, H, W), filters (K, C, kh, kw), biases (K,), and the output (K, Ho, Wo) they give."""

    x: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    stride: int
    padding: int
    out: np.ndarray


def numeric_example(seed: int = 0) -> NumericExample:
    """CS231n's demo: a 5x5x3 input of 0..2, zero padding 1, two 3x3x3 filters of -1..1, biases 1 and 0, stride 2.

    The output is 3x3x2 ((5 + 2 - 3) / 2 + 1 = 3); arrays here are channel-first, so `out.shape == (2, 3, 3)`.
    """
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, size=(3, 5, 5))
    weight = rng.integers(-1, 2, size=(2, 3, 3, 3))
    bias = np.array([1, 0])
    out = conv2d_by_hand(x, weight, bias, stride=2, padding=1)
    return NumericExample(x, weight, bias, 2, 1, out)


# ---------------------------------------------------------------------------------------------- images


def default_image(size: int = DEFAULT_SIZE) -> np.ndarray:
    """A synthetic scene, (size, size, 3) floats in [0, 1]: sky, sun, a red house with a door, grass.

    Drawn at 8x the size and averaged down, so edges are soft as in a photo. It has vertical edges (walls, door),
    a horizontal one (the horizon), a diagonal roof and colour contrast (red house on green), one for each filter.
    """
    n = 8 * size
    v, u = (np.mgrid[0:n, 0:n] + 0.5) / n  # v: down, u: right, both in [0, 1]
    sky_top, sky_low = np.array([0.30, 0.55, 0.90]), np.array([0.75, 0.87, 1.00])
    img = sky_top + (sky_low - sky_top) * (v / 0.68)[..., None]
    img[v > 0.68] = (0.20, 0.58, 0.20)  # grass
    img[(u - 0.80) ** 2 + (v - 0.20) ** 2 < 0.11**2] = (1.00, 0.85, 0.20)  # sun
    img[(u > 0.14) & (u < 0.52) & (v > 0.42) & (v < 0.82)] = (0.80, 0.15, 0.10)  # walls
    roof = (v > 0.20) & (v <= 0.42) & (np.abs(u - 0.33) < (v - 0.20) / 0.22 * 0.24)
    img[roof] = (0.30, 0.22, 0.20)
    img[(u > 0.27) & (u < 0.38) & (v > 0.60) & (v < 0.82)] = (0.20, 0.12, 0.05)  # door
    img[(u > 0.42) & (u < 0.48) & (v > 0.50) & (v < 0.58)] = (0.95, 0.95, 0.80)  # window
    # average each 8x8 block: the same box filter PIL uses to shrink photos in load_image
    return img.reshape(size, 8, size, 8, 3).mean(axis=(1, 3))


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, the weights PIL's convert('L') uses: green counts most, as it does for the eye."""
    return np.asarray(rgb, dtype=float) @ np.array([0.299, 0.587, 0.114])


def to_levels(image: np.ndarray, levels: int = LEVELS) -> np.ndarray:
    """[0, 1] floats -> integers 0..levels-1, so every number on a slide is short and exact."""
    return np.round(np.clip(image, 0.0, 1.0) * (levels - 1)).astype(np.int64)


def load_image(path: str | Path, size: int = DEFAULT_SIZE, gray: bool = True) -> np.ndarray:
    """An image file as floats in [0, 1]: (size, size) grey or (size, size, 3) RGB, centre-cropped square, then
    shrunk by area averaging (PIL's BOX filter), which keeps thin edges visible at 16x16."""
    if size < 1:
        raise ConfigError(f"image size must be at least 1 pixel; got {size}")
    im = open_image(path).convert("L" if gray else "RGB")  # refuses huge or malformed files, naming them
    side = min(im.size)
    left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BOX)
    return np.asarray(im, dtype=float) / 255.0


def prepare_rgb(image, size: int) -> np.ndarray:
    """None (the default scene), a file path, or an array ((H, W) or (H, W, 3); uint8 or [0, 1] floats) ->
    (size, size, 3) floats in [0, 1]."""
    if image is None:
        return default_image(size)
    if isinstance(image, (str, Path)):
        return load_image(image, size, gray=False)
    a = as_array(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ImageError(f"an image array must be (H, W) or (H, W, 3); got shape {a.shape}")
    a = a.astype(float) / 255.0 if a.dtype == np.uint8 else np.clip(a.astype(float), 0.0, 1.0)
    if a.shape[:2] != (size, size):
        pil = Image.fromarray((a * 255).round().astype(np.uint8))
        a = np.asarray(pil.resize((size, size), Image.Resampling.BOX), dtype=float) / 255.0
    return a


# ---------------------------------------------------------------------------------------------- filters


def _per_channel(k: np.ndarray) -> np.ndarray:
    return np.stack([k, k, k])


def _opponent(plus: tuple[float, float, float]) -> np.ndarray:
    return np.stack([np.full((3, 3), w) for w in plus])


# Filters for slide (b), (3, 3, 3) each = (R, G, B) planes, in the order shown. Each has integer weights times
# one scale, so the slide can print whole numbers and "x 1/d". The first five are the default bank.
_COLOR_BANK: list[tuple[str, np.ndarray]] = [
    # Sobel on brightness (the channels' mean): light-to-dark changes across columns, i.e. vertical edges
    ("vertical edge", _per_channel(VERTICAL_EDGE) / 3),
    # the same turned by 90 degrees: horizontal edges such as the horizon
    ("horizontal edge", _per_channel(VERTICAL_EDGE.T) / 3),
    # box blur: the mean of all 27 numbers, local brightness with detail removed
    ("blur", np.ones((3, 3, 3)) / 27),
    # colour-opponent, like the retina's red-green channel: positive on red, negative on green, blind to blue
    ("red - green", _opponent((1, -1, 0)) / 9),
    # sharpen: 5x the centre minus its 4 neighbours, brightness with its edges amplified
    ("sharpen", _per_channel(np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]])) / 3),
    # the other opponent pair: blue against yellow (red + green)
    ("blue - yellow", _opponent((-1, -1, 2)) / 18),
    # Sobel at 45 degrees: diagonal edges such as a roof line
    ("diagonal edge", _per_channel(np.array([[0, 1, 2], [-1, 0, 1], [-2, -1, 0]])) / 3),
    # centre minus surround (a Laplacian): small spots and blobs, zero on flat and on linear ramps
    ("centre - surround", _per_channel(np.array([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]])) / 3),
]
COLOR_FILTER_NAMES = [name for name, _ in _COLOR_BANK]


def color_filters(n: int = 5) -> tuple[list[str], np.ndarray]:
    """The first `n` (1..8) filters of the colour bank: names and weights (n, 3, 3, 3)."""
    if not 1 <= n <= MAX_COLOR_FILTERS:
        raise ConfigError(
            f"filters must be 1..{MAX_COLOR_FILTERS}; got {n} (the bank: {', '.join(COLOR_FILTER_NAMES)})"
        )
    bank = _COLOR_BANK[:n]
    return [name for name, _ in bank], np.stack([w for _, w in bank])


def edge_feature_map(image=None, size: int = DEFAULT_SIZE) -> np.ndarray:
    """A real feature map, (1, size, size) integers: slide (a)'s vertical-edge conv (padding 1) on the grey
    levels 0..9, then ReLU, which keeps the dark-to-bright (left to right) edges and zeroes the rest."""
    gray = to_levels(to_gray(prepare_rgb(image, size)))
    return np.maximum(conv2d_by_hand(gray[None], VERTICAL_EDGE[None, None], padding=1), 0)
