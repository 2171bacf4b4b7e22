"""Test-time augmentation: logits averaged over fixed views of each image, with airbench's views and weights
(Jordan 2024, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU", arXiv 2404.00498).

Level 0 is the image alone; level 1 the image and its mirror, 1/2 each; level 2 gives those two 1/4 each and
adds the image translated by one pixel up-and-left and by one pixel down-and-right (reflection at the border),
each with its mirror, 1/8 each. Logits are averaged, not probabilities, as the paper does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["TTAView", "tta_views", "tta_logits", "TTA_LEVELS"]


class TTAView(NamedTuple):
    """out[:, :, i, j] = x[:, :, i + dy, j + dx] (border reflected, no repeated edge), then mirrored if `flip`."""

    weight: float
    flip: bool
    dy: int = 0
    dx: int = 0


TTA_LEVELS = {
    0: (TTAView(1.0, False),),
    1: (TTAView(0.5, False), TTAView(0.5, True)),
    # airbench's infer_mirror_translate: 1/2 * mirror-mean(image) + 1/2 * mean of mirror-means of the two
    # translations F.pad(x, 1, 'reflect')[:, :, 0:H, 0:W] (dy = dx = -1) and [:, :, 2:H+2, 2:W+2] (dy = dx = +1)
    2: (
        TTAView(0.25, False),
        TTAView(0.25, True),
        TTAView(0.125, False, -1, -1),
        TTAView(0.125, True, -1, -1),
        TTAView(0.125, False, 1, 1),
        TTAView(0.125, True, 1, 1),
    ),
}


def tta_views(level: int) -> tuple[TTAView, ...]:
    if level not in TTA_LEVELS:
        raise ConfigError(
            f"TTA level {level!r} is invalid; choose 0 (none), 1 (mirror) or 2 (mirror and 1-pixel translations)"
        )
    return TTA_LEVELS[level]


def _view(x: torch.Tensor, view: TTAView, padded: torch.Tensor | None, pad: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if view.dy or view.dx:
        assert padded is not None  # a translated view makes pad > 0
        x = padded[:, :, pad + view.dy : pad + view.dy + h, pad + view.dx : pad + view.dx + w]
    return x.flip(3) if view.flip else x


def tta_logits(model: nn.Module, x: torch.Tensor, level: int = 2) -> torch.Tensor:
    """The weighted mean of `model`'s logits over the level's views of the normalised (N, C, H, W) batch `x`,
    in float32. Call it as you would call the model: in eval mode, under torch.no_grad() and any autocast.
    """
    views = tta_views(level)
    # keep the caller's memory format: a channels_last model fed NCHW views would convert every one of them
    layout = (
        torch.channels_last
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        else torch.contiguous_format
    )
    pad = max(max(abs(v.dy), abs(v.dx)) for v in views)
    padded = F.pad(x, (pad,) * 4, mode="reflect") if pad else None  # once for all translated views
    total = None
    for view in views:
        logits = model(_view(x, view, padded, pad).contiguous(memory_format=layout)).float() * view.weight
        total = logits if total is None else total.add_(logits)
    assert total is not None  # every level has a view
    return total
