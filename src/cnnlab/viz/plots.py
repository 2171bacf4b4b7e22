"""Figures written with matplotlib's Agg backend: confusion matrices and per-class sample montages."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..files import save_atomic  # noqa: E402

__all__ = ["plot_confusion", "plot_montage"]


def _save(fig, path: Path) -> None:
    import io
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    save_atomic(buffer.getvalue(), Path(path))


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix (true class by row), with counts in each cell when there are few classes."""
    counts = np.asarray(confusion, dtype=np.int64)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(classes)
    size = min(max(4.0, 0.55 * n + 2), 16)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
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
    _save(fig, path)


def plot_montage(images: torch.Tensor, labels: torch.Tensor, classes: list[str], path: Path,
                 per_class: int = 8, title: str = "") -> None:
    """A grid with one row per class and `per_class` sample images in each."""
    n = len(classes)
    rows = min(n, 20)
    fig, axes = plt.subplots(rows, per_class, figsize=(per_class * 0.9 + 1.5, rows * 0.9 + 0.6), squeeze=False)
    for r in range(rows):
        idx = (labels == r).nonzero().flatten()[:per_class]
        for j in range(per_class):
            ax = axes[r][j]
            ax.axis("off")
            if j < len(idx):
                img = images[idx[j]].permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                          vmin=0, vmax=255, interpolation="nearest")
        axes[r][0].text(-0.1, 0.5, classes[r], transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle(title or "Samples per class")
    _save(fig, path)
