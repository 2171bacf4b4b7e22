"""Model summary in the style of Keras's `model.summary()` and torchinfo: layers, shapes, parameters, MACs.

MACs count the multiply-accumulates of convolutions and dense layers (1 MAC = 2 FLOPs), per image, as the
papers' figures do; bias additions, normalisation, activations and pooling are not counted.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError, ModelError

__all__ = ["summarize", "format_summary", "count_params", "check_input_size", "smallest_input", "receptive_fields"]

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
def summarize(model: nn.Module, input_size: tuple[int, int, int], depth: int | None = None) -> dict:
    """Run one zero image through `model`, recording every leaf layer's output shape, parameters and MACs.
    With `depth` (as torchinfo's), the layers are added up into the modules `depth` names deep: depth 1 gives
    ResNet-50 as conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc (each with its last output shape)."""
    layers: list[dict] = []
    hooks = []

    def record(name: str):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            layers.append(
                {
                    "name": name,
                    "type": type(module).__name__,
                    "output_shape": list(out.shape),
                    "params": sum(p.numel() for p in module.parameters(recurse=False)),
                    "macs": _macs(module, out),
                }
            )

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
    if depth is not None:
        layers = _group(model, layers, depth)
    params = count_params(model)
    return {
        "input_size": list(input_size),
        "params": params,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "macs": sum(layer["macs"] for layer in layers),
        "mac_note": MAC_NOTE,
        "layers": layers,
    }


def _group(model: nn.Module, layers: list[dict], depth: int) -> list[dict]:
    """Leaf rows added up by the first `depth` parts of their names, in the order the groups were first called;
    a group's output shape is that of its last call (a residual block's: after the addition and ReLU)."""
    if depth < 1:
        raise ConfigError(f"depth counts name parts (1: 'layer1', 2: 'layer1.0'); it must be at least 1, got {depth}")
    groups: dict[str, dict] = {}
    for layer in layers:
        name = ".".join(layer["name"].split(".")[:depth])
        row = groups.setdefault(
            name,
            {
                "name": name,
                "type": type(model.get_submodule(name)).__name__,
                "output_shape": None,
                "params": 0,
                "macs": 0,
                "_seen": set(),
            },
        )
        if layer["name"] not in row["_seen"]:  # a module called twice (a shared ReLU) holds its parameters once
            row["params"] += layer["params"]
            row["_seen"].add(layer["name"])
        row["macs"] += layer["macs"]
        row["output_shape"] = layer["output_shape"]
    return [{k: v for k, v in row.items() if k != "_seen"} for row in groups.values()]


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def format_summary(info: dict, title: str = "") -> str:
    rows = [
        (f"{layer['name']} ({layer['type']})", str(layer["output_shape"]), f"{layer['params']:,}", f"{layer['macs']:,}")
        for layer in info["layers"]
    ]
    head = ("Layer (type)", "Output shape", "Params", "MACs")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    line = "-" * (sum(widths) + 6)

    def fmt(r):
        return f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}"

    out = [title] if title else []
    out += [
        line,
        fmt(head),
        line,
        *map(fmt, rows),
        line,
        f"Input: {'x'.join(map(str, info['input_size']))}",
        f"Total params: {info['params']:,} ({_si(info['params'])}), trainable: {info['trainable_params']:,}",
        f"Total MACs per image: {info['macs']:,} ({_si(info['macs'])}MACs = {_si(2 * info['macs'])}FLOPs; "
        f"{info['mac_note']})",
    ]
    return "\n".join(out)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def receptive_fields(model: nn.Module) -> list[dict]:
    """For each conv and pooling layer of a chain (nn.Sequential, the lecture's ConvNet, a `cnn` spec), in order:
    `size`, the (height, width) of the input patch one of its output units sees, and `step`, the input pixels
    between neighbouring units. Each layer adds (kernel - 1) * dilation * step to the size and multiplies the
    step by its stride. Models with branches (ResNets' shortcuts) are refused: their layers are no chain."""
    names = [
        name
        for name, m in model.named_modules()
        if hasattr(m, "downsample") or type(m).__name__ in ("BasicBlock", "Bottleneck")
    ]
    if names:
        raise ModelError(
            f"{type(model).__name__} has residual blocks ({names[0]}, ...): its layers are no single "
            "chain, so receptive_fields cannot add them up in order"
        )
    size: tuple[int, ...] = (1, 1)
    step: tuple[int, ...] = (1, 1)
    rows: list[dict] = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            kernel, stride = _pair(m.kernel_size), _pair(m.stride)
            dilation = _pair(getattr(m, "dilation", 1))
            size = tuple(r + (k - 1) * d * j for r, k, d, j in zip(size, kernel, dilation, step))
            step = tuple(j * s for j, s in zip(step, stride))
            rows.append({"name": name, "type": type(m).__name__, "size": size, "step": step})
    return rows


def _runs_on(model: nn.Module, shape: tuple[int, ...]) -> bool:
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
    raise ConfigError(
        f"model {name!r} needs input of at least {side}x{side} pixels, but {what} gives {h}x{w}: "
        f"upsample with --image-size {side} or more (images are resized batch by batch), or choose "
        "a model made for small images (e.g. convnet, resnet20)"
    )
