"""Model summary in the style of Keras's `model.summary()` and torchinfo: layers, shapes, parameters, MACs.

MACs count the multiply-accumulates of convolutions and dense layers (1 MAC = 2 FLOPs), per image, as the
papers' figures do; bias additions, normalisation, activations and pooling are not counted.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["summarize", "format_summary", "count_params"]

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
