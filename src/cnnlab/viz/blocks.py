"""Residual blocks drawn as in He et al. 2016, Fig. 5: the layers of the main path top to bottom with the shape
each gives, the shortcut beside them, and the addition. The shapes are measured by running the block."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyBboxPatch

from ..errors import ModelError
from ..models.summary import summarize
from .figure import OKABE_ITO, finish, new_figure

__all__ = ["block_layers", "plot_blocks"]


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        k = "x".join(map(str, module.kernel_size))
        stride = f", /{module.stride[0]}" if module.stride[0] > 1 else ""  # the paper's mark of a stride
        return f"{k} conv, {module.out_channels}{stride}"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "BN"
    return {"ReLU": "ReLU", "PadShortcut": "subsample + zero-pad"}.get(type(module).__name__, type(module).__name__)


@torch.no_grad()
def block_layers(block: nn.Module, input_shape: Sequence[int]) -> dict:
    """Run one zero input (C, H, W) through a residual block and return its main path as `stages` (a conv with the
    BN and ReLU after it, and the shape it gives), its `shortcut` ("identity", a projection or padding, with its
    shape; None for a plain block), `output` shape, `params` and `macs` (per image; 1 MAC = 2 FLOPs)."""
    if not hasattr(block, "downsample"):
        raise ModelError(
            f"{type(block).__name__} is not a residual block (no `downsample` attribute); give one "
            "from a ResNet, e.g. create_model('resnet50').layer1[0]"
        )
    calls: list[tuple[str, nn.Module, tuple]] = []
    leaves = [(name, m) for name, m in block.named_modules() if next(m.children(), None) is None]
    hooks = [
        m.register_forward_hook(lambda m, i, out, name=name: calls.append((name, m, tuple(out.shape[1:]))))
        for name, m in leaves
    ]
    was_training = block.training
    try:
        param = next(block.parameters(), None)
        block.eval()(torch.zeros(1, *input_shape, device=param.device if param is not None else None))
    finally:
        for h in hooks:
            h.remove()
        block.train(was_training)
    *main, last = calls  # the last call is the ReLU after the addition
    stages: list[dict] = []
    shortcut: list[str] = []
    shortcut_shape = tuple(input_shape)
    for name, module, shape in main:
        if name.startswith("downsample"):
            shortcut.append(_describe(module))
            shortcut_shape = shape
        elif isinstance(module, nn.Conv2d) or not stages:
            stages.append({"layers": [_describe(module)], "shape": shape})
        else:
            stages[-1]["layers"].append(_describe(module))
            stages[-1]["shape"] = shape
    residual = getattr(block, "residual", True)
    info = summarize(block, cast(tuple[int, int, int], tuple(input_shape)))  # (C, H, W)
    return {
        "input": tuple(input_shape),
        "stages": stages,
        "shortcut": None if not residual else (" + ".join(shortcut) if shortcut else "identity"),
        "shortcut_shape": shortcut_shape,
        "output": last[2],
        "params": info["params"],
        "macs": info["macs"],
    }


def _draw_block(ax, info: dict, title: str, rows: int) -> None:
    """One block in data units: stages 2 apart from the input at the top; `rows` (the most stages of any block
    drawn beside it) fixes the height, so that side by side every box has the same size."""
    top, gap = 2 * rows + 3, 2.0
    ax.set_xlim(-2.2, 5.0)
    ax.set_ylim(-0.9, top + 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    box = dict(ha="center", va="center", fontsize=9)
    grey = "#333333"

    def arrow(y0, y1, shape=None):
        ax.annotate("", (0, y1), (0, y0), arrowprops=dict(arrowstyle="-|>", color=grey, lw=1.2))
        if shape:
            ax.text(0.12, (y0 + y1) / 2, _shape(shape), ha="left", va="center", fontsize=8, color="#555555")

    ax.text(0, top, f"input {_shape(info['input'])}", **box, fontweight="bold")
    y: float
    y, shape = top, None
    for stage in info["stages"]:
        arrow(y - 0.35, y - gap + 0.45, shape)
        y -= gap
        ax.add_patch(
            FancyBboxPatch(
                (-1.9, y - 0.4),
                3.8,
                0.8,
                boxstyle="round,pad=0.05",
                facecolor=OKABE_ITO["sky blue"],
                alpha=0.35,
                edgecolor=grey,
            )
        )
        ax.text(0, y, ", ".join(stage["layers"]), **box)
        shape = stage["shape"]
    join = y - gap
    if info["shortcut"] is None:
        arrow(y - 0.45, join + 0.3, shape)
        ax.text(0, join, "ReLU (no shortcut: a plain block)", **box)
    else:
        arrow(y - 0.45, join + 0.3, shape)
        ax.add_patch(Circle((0, join), 0.28, facecolor="white", edgecolor=grey, lw=1.2))
        ax.text(0, join, "+", **box, fontweight="bold")
        x, colour = 2.4, OKABE_ITO["vermillion"]  # the shortcut: from the input, down the right side, into the sum
        ax.plot([1.3, x, x], [top, top, join], color=colour, lw=1.6)
        ax.annotate("", (0.3, join), (x, join), arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.6))
        label = (
            "identity"
            if info["shortcut"] == "identity"
            else info["shortcut"].replace(" + ", "\n+ ") + f"\n{_shape(info['shortcut_shape'])}"
        )
        ax.text(x + 0.12, (top + join) / 2, label, ha="left", va="center", fontsize=8, color=colour)
        join -= 1.0
        arrow(join + 0.7, join + 0.25)
        ax.text(0, join, "ReLU", **box)
    ax.text(0, join - 0.6, f"output {_shape(info['output'])}", **box, fontweight="bold")
    ax.set_title(f"{title}\n{info['params']:,} parameters, {info['macs'] / 1e6:.1f} M MACs per image", fontsize=10)


def plot_blocks(blocks: Sequence[tuple[str, nn.Module, Sequence[int]]], path: str | Path | None = None) -> Figure:
    """Residual blocks side by side, each given as (title, block, input shape (C, H, W)), e.g. ResNet-34's basic
    block beside ResNet-50's bottleneck."""
    if not blocks:
        raise ModelError("plot_blocks needs at least one (title, block, input shape)")
    infos = [(title, block_layers(block, shape)) for title, block, shape in blocks]
    rows = max(len(info["stages"]) for _, info in infos)
    fig = new_figure(4.0 * len(infos), 0.55 * (2 * rows + 4.5) + 0.8, layout="constrained")
    for ax, (title, info) in zip(fig.subplots(1, len(infos), squeeze=False)[0], infos):
        _draw_block(ax, info, title, rows)
    return finish(fig, path)
