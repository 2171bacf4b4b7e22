"""Figures of a dataset and a model's mistakes: confusion matrices and per-class sample montages."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from .figure import finish, image_grid, subplots

__all__ = ["plot_confusion", "plot_montage", "as_image"]


def as_image(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) uint8 -> (H, W) for one channel, (H, W, 3) for colour: what `image_grid` draws."""
    pixels = image.permute(1, 2, 0).numpy()
    return pixels[..., 0] if pixels.shape[2] == 1 else pixels


def plot_confusion(confusion: list[list[int]], classes: list[str], path: str | Path | None = None,
                   title: str = "") -> Figure:
    """Row-normalised confusion matrix (true class by row), with counts in each cell when there are few classes."""
    counts = np.asarray(confusion, dtype=np.int64)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(classes)
    size = min(max(4.0, 0.55 * n + 2), 16)
    fig, ax = subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rates, cmap="viridis", vmin=0, vmax=1)  # perceptually uniform, colour-blind safe
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 20:
        ax.set_xticks(range(n), classes, rotation=60, ha="right")
        ax.set_yticks(range(n), classes)
        for t in range(n):
            for p in range(n):
                ax.text(p, t, f"{counts[t, p]}", ha="center", va="center", fontsize=7,
                        color="black" if rates[t, p] > 0.5 else "white")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "Confusion matrix (counts; colour = row fraction)")
    return finish(fig, path)


def plot_montage(images: torch.Tensor, labels: torch.Tensor, classes: list[str], path: str | Path | None = None,
                 per_class: int = 8, title: str = "") -> Figure:
    """A grid with one row per class (the first 20) and `per_class` sample images in each."""
    rows = min(len(classes), 20)
    cells = []
    for r in range(rows):
        idx = (labels == r).nonzero().flatten()[:per_class].tolist()
        cells += [as_image(images[i]) for i in idx] + [None] * (per_class - len(idx))
    return image_grid(cells, per_class, row_labels=classes[:rows],
                      title=title or "Samples per class", path=path)
