"""Figures of a dataset and a model's mistakes: confusion matrices, per-class sample montages, images with their
predictions (a run's highest-loss test images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from .figure import finish, image_grid, subplots

__all__ = ["plot_confusion", "plot_montage", "plot_predictions", "plot_highest_loss", "as_image"]


def as_image(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) uint8 -> (H, W) for one channel, (H, W, 3) for colour: what `image_grid` draws."""
    pixels = image.permute(1, 2, 0).numpy()
    return pixels[..., 0] if pixels.shape[2] == 1 else pixels


def plot_confusion(
    confusion: list[list[int]], classes: list[str], path: str | Path | None = None, title: str = ""
) -> Figure:
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
                ax.text(
                    p,
                    t,
                    f"{counts[t, p]}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if rates[t, p] > 0.5 else "white",
                )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "Confusion matrix (counts; colour = row fraction)")
    return finish(fig, path)


def plot_montage(
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    path: str | Path | None = None,
    per_class: int = 8,
    title: str = "",
) -> Figure:
    """A grid with one row per class (the first 20) and `per_class` sample images in each."""
    rows = min(len(classes), 20)
    cells = []
    for r in range(rows):
        idx = (labels == r).nonzero().flatten()[:per_class].tolist()
        cells += [as_image(images[i]) for i in idx] + [None] * (per_class - len(idx))
    return image_grid(cells, per_class, row_labels=classes[:rows], title=title or "Samples per class", path=path)


def plot_predictions(
    images,
    labels,
    preds,
    classes: list[str],
    losses=None,
    cols: int = 8,
    title: str = "",
    path: str | Path | None = None,
) -> Figure:
    """uint8 images (N, C, H, W) titled with their true and predicted class (and their loss, when given)."""
    losses = [None] * len(labels) if losses is None else [float(v) for v in losses]
    titles = [
        f"true {classes[int(t)]}\npred {classes[int(p)]}" + ("" if v is None else f"\nloss {v:.2f}")
        for t, p, v in zip(labels, preds, losses)
    ]
    return image_grid(
        [as_image(image) for image in images], cols, titles=titles, cell_inches=1.4, title=title, path=path
    )


def plot_highest_loss(run, k: int = 16, cols: int = 8, path: str | Path | None = None) -> Figure:
    """The `k` test images a finished run (a `Run` or its folder) got most wrong, highest loss first."""
    from ..inference.test_split import highest_loss_images
    from ..run import open_run

    run = open_run(run) if isinstance(run, (str, Path)) else run
    worst = highest_loss_images(run, k)
    return plot_predictions(
        worst["images"],
        worst["labels"],
        worst["preds"],
        run.classes,
        worst["losses"],
        cols,
        title=f"The {len(worst['losses'])} test images with the highest loss",
        path=path,
    )
