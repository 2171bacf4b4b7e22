"""The one scorer of a test split, used by training, `cnnlab eval` and the report: loss, accuracy, top-5,
per-class accuracy, the confusion matrix and, when asked, each image's loss and prediction.

In a distributed run each rank scores its own contiguous share of the split and the counts are summed,
so the accuracy equals the one-process figure for the same weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .runtime import Runtime, pick_channels_last, pick_device, pick_precision

__all__ = ["evaluate", "most_confused", "prepare_for_inference", "inference_runtime"]


def inference_runtime(device: str | torch.device = "auto", precision: str = "auto") -> Runtime:
    """The settings cnnlab picks for inference by the same rules as training (one process)."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    prec, prec_why = pick_precision(precision, dev)
    cl, cl_why = pick_channels_last("auto", dev, prec)
    return Runtime(dev, prec, prec_why, cl, cl_why, torch.get_num_threads())


def prepare_for_inference(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Eval mode, on the runtime's device and memory format."""
    return model.eval().to(runtime.device, memory_format=runtime.memory_format)


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, *, runtime: Runtime | None = None,
             per_image: bool = False, tta: int = 0) -> dict:
    """Run `model` over every batch of `loader` (this rank's share in a distributed run).

    Returns n, loss, accuracy, top5 (with more than 5 classes), per_class and confusion (true class by row);
    with `per_image`, also `losses` and `preds`: one value per image of the whole split, in its order.
    `tta` > 0 averages the logits over mirrored (and, at 2, shifted) views (engine/tta.py).
    """
    from .tta import tta_logits
    runtime = runtime or Runtime(loader.device)
    was_training = model.training
    model.eval()
    device = loader.device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, top-5 hits
    losses, preds = [], []
    try:
        for x, y in loader:
            with runtime.autocast():
                logits = tta_logits(model, x, tta) if tta else model(x)
            logits = logits.float()
            loss = F.cross_entropy(logits, y, reduction="none")
            pred = logits.argmax(1)
            sums[0] += loss.double().sum()
            confusion += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view(num_classes, -1)
            if num_classes > 5:
                sums[1] += (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum()
            if per_image:
                losses.append(loss.cpu())
                preds.append(pred.cpu())
    finally:
        model.train(was_training)
    runtime.all_reduce(confusion)
    runtime.all_reduce(sums)
    confusion = confusion.cpu()
    n = int(confusion.sum())
    per_class_total = confusion.sum(1).clamp_min(1)
    result = {
        "n": n,
        "loss": sums[0].item() / max(n, 1),
        "accuracy": confusion.diag().sum().item() / max(n, 1),
        "per_class": (confusion.diag() / per_class_total).tolist(),
        "confusion": confusion.tolist(),
    }
    if num_classes > 5:
        result["top5"] = sums[1].item() / max(n, 1)
    if per_image:  # ranks hold consecutive shares, so rank order is the split's order
        shares = runtime.gather((torch.cat(losses) if losses else torch.empty(0),
                                 torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)))
        result["losses"] = torch.cat([s[0] for s in shares])
        result["preds"] = torch.cat([s[1] for s in shares])
    return result


def most_confused(confusion: list[list[int]], classes: list[str], k: int = 5) -> list[dict]:
    """The k largest off-diagonal cells: how often class `true` was predicted as `predicted`."""
    pairs = [(count, t, p) for t, row in enumerate(confusion) for p, count in enumerate(row) if t != p and count]
    pairs.sort(reverse=True)
    return [{"true": classes[t], "predicted": classes[p], "count": c} for c, t, p in pairs[:k]]
