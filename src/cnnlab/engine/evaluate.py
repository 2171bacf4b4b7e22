"""Evaluation: accuracy, top-5, per-class accuracy, confusion matrix and the most-confused pairs."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["evaluate", "most_confused", "autocast_for", "prepare_for_inference"]


def autocast_for(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def prepare_for_inference(model: nn.Module, device: torch.device, precision: str = "auto") -> tuple[nn.Module, bool]:
    """What cnnlab picks for inference: eval mode, channels_last, bf16 autocast where it is native; (model, bf16)."""
    from .trainer import pick_precision  # the same rule as training
    model = model.eval().to(device, memory_format=torch.channels_last)
    return model, pick_precision(precision, device) == "bf16"


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, *, bf16: bool = False) -> dict:
    """Run `model` over every batch of `loader`; returns loss, accuracy, top5 (if > 5 classes) and confusion."""
    was_training = model.training
    model.eval()
    device = loader.device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        for x, y in loader:
            with autocast_for(device, bf16):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            pred = logits.argmax(1)
            confusion += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view(num_classes, -1)
            if num_classes > 5:
                top5 += (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum()
            n += len(y)
    finally:
        model.train(was_training)
    confusion = confusion.cpu()
    per_class_total = confusion.sum(1).clamp_min(1)
    result = {
        "n": n,
        "loss": loss_sum.item() / max(n, 1),
        "accuracy": confusion.diag().sum().item() / max(n, 1),
        "per_class": (confusion.diag() / per_class_total).tolist(),
        "confusion": confusion.tolist(),
    }
    if num_classes > 5:
        result["top5"] = top5.item() / max(n, 1)
    return result


def most_confused(confusion: list[list[int]], classes: list[str], k: int = 5) -> list[dict]:
    """The k largest off-diagonal cells: how often class `true` was predicted as `predicted`."""
    pairs = [(count, t, p) for t, row in enumerate(confusion) for p, count in enumerate(row) if t != p and count]
    pairs.sort(reverse=True)
    return [{"true": classes[t], "predicted": classes[p], "count": c} for c, t, p in pairs[:k]]
