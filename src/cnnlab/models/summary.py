"""Model summary in the style of Keras's `model.summary()` and torchinfo: layers, shapes, parameters, MACs.

MACs count the multiply-accumulates of convolutions and dense layers (1 MAC = 2 FLOPs), per image, as the
papers' figures do; bias additions, normalisation, activations and pooling are not counted.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError

__all__ = ["summarize", "format_summary", "count_params", "check_input_size", "smallest_input"]

MAC_NOTE = "1 MAC = 2 FLOPs; convolutions and dense layers only, bias additions not counted"


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    per_image = output[0].numel()
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        return per_image * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return per_image * module.in_features
    return 0


@torch.no_grad()
def summarize(model: nn.Module, input_size: tuple[int, int, int]) -> dict:
    """Run one zero image through `model`, recording every leaf layer's output shape, parameters and MACs."""
    layers: list[dict] = []
    hooks = []

    def record(name: str):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            layers.append({"name": name, "type": type(module).__name__, "output_shape": list(out.shape),
                           "params": sum(p.numel() for p in module.parameters(recurse=False)),
                           "macs": _macs(module, out)})
        return hook

    for name, module in model.named_modules():
        is_leaf = next(module.children(), None) is None
        has_own_params = next(module.parameters(recurse=False), None) is not None
        if name and (is_leaf or has_own_params):
            hooks.append(module.register_forward_hook(record(name)))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model(torch.zeros(1, *input_size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    params = count_params(model)
    return {"input_size": list(input_size), "params": params,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "macs": sum(layer["macs"] for layer in layers), "mac_note": MAC_NOTE, "layers": layers}


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def format_summary(info: dict, title: str = "") -> str:
    rows = [(f"{layer['name']} ({layer['type']})", str(layer["output_shape"]), f"{layer['params']:,}",
             f"{layer['macs']:,}") for layer in info["layers"]]
    head = ("Layer (type)", "Output shape", "Params", "MACs")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    line = "-" * (sum(widths) + 6)

    def fmt(r):
        return f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}"
    out = [title] if title else []
    out += [line, fmt(head), line, *map(fmt, rows), line,
            f"Input: {'x'.join(map(str, info['input_size']))}",
            f"Total params: {info['params']:,} ({_si(info['params'])}), trainable: {info['trainable_params']:,}",
            f"Total MACs per image: {info['macs']:,} ({_si(info['macs'])}MACs = {_si(2 * info['macs'])}FLOPs; "
            f"{info['mac_note']})"]
    return "\n".join(out)


def _runs_on(model: nn.Module, shape: tuple[int, int, int]) -> bool:
    """Whether `model` (on the meta device: no memory, no arithmetic) accepts a (1, *shape) input."""
    try:
        with torch.device("meta"):
            model.eval()(torch.empty(1, *shape))
        return True
    except Exception:  # any layer may object to a shape, each with its own error type
        return False


def smallest_input(model: nn.Module, channels: int, limit: int = 1024) -> int | None:
    """The smallest square side (pixels) that `model` accepts, or None if none up to `limit` does."""
    hi = 1
    while not _runs_on(model, (channels, hi, hi)):
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2  # fails (or 0); hi works
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _runs_on(model, (channels, mid, mid)) else (mid, hi)
    return hi


def check_input_size(name: str, model_args: dict, shape: tuple[int, int, int], what: str = "the data") -> None:
    """Refuse, before any work, a model that cannot take `shape` images, naming its minimum and the fix."""
    from .registry import create_model
    with torch.device("meta"):
        model = create_model(name, **model_args)
    if _runs_on(model, tuple(shape)):
        return
    c, h, w = shape
    side = smallest_input(model, c)
    if side is None:
        raise ConfigError(f"model {name!r} with {model_args} does not accept {c}x{h}x{w} input from {what}")
    raise ConfigError(f"model {name!r} needs input of at least {side}x{side} pixels, but {what} gives {h}x{w}: "
                      f"upsample with --image-size {side} or more (images are resized batch by batch), or choose "
                      "a model made for small images (e.g. convnet, resnet20)")
