"""The lecture's "traditional" CNN: conv + ReLU stages, pooling, dense layers at the end.

`TraditionalCNN` builds any such network from a short spec; `convnet` is the lecture's
Complete Network as one spec. `ConvNet` is the lecture's alternate form, a module class with
a hand-written `forward`, kept so the two forms can be compared weight for weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn

from ..errors import ModelError
from .registry import register_model

__all__ = [
    "TraditionalCNN",
    "ConvNet",
    "parse_spec",
    "spec_values",
    "sequential_to_convnet_state",
    "convnet",
    "cnn",
    "convnet_module",
]

# The lecture's Complete Network: two 5-channel convs, a 2x2 max-pool, two 8-channel convs, a 128-unit
# dense layer (the final Linear to num_classes is implicit).
CONVNET_SPEC = "c5x2,p,c8x2,f128"

_TOKEN = re.compile(  # numbers of up to 9 digits: a sidecar's spec is read before any model is built
    r"^(?:c(?P<conv>\d{1,9})(?:k(?P<k>\d{1,9}))?(?:s(?P<s>\d{1,9}))?(?P<bn>b)?(?:x(?P<rep>\d{1,9}))?"
    r"|(?P<pool>[pa])(?P<pk>\d{1,9})?"
    r"|f(?P<fc>\d{1,9})"
    r"|d(?P<drop>0?\.\d+)"
    r"|(?P<gap>g))$"
)

SPEC_HELP = (
    "comma-separated layers: cN = NxN... conv with N output channels (3x3, 'same'), with optional kK kernel, "
    "sS stride, b batch-norm, xR repeat (c64k7s2, c32bx2); p / pK = max-pool 2x2 / KxK; a / aK = average pool; "
    "g = global average pool; fN = dense layer of N units; d0.5 = dropout. The final dense layer to "
    f"num_classes is added. Example (the lecture's convnet): {CONVNET_SPEC}"
)


@dataclass(frozen=True)
class _Layer:
    kind: str  # conv | maxpool | avgpool | gap | fc | dropout
    size: int = 0
    kernel: int = 3
    stride: int = 1
    batchnorm: bool = False
    p: float = 0.0


def parse_spec(spec: str) -> list[_Layer]:
    """Parse a spec such as ``"c5x2,p,c8x2,f128"`` into layers; a bad token names itself and the grammar. More
    layers than data.images.Limits.model_layers are refused before any is listed ("c8x100000000")."""
    from ..data.images import limits, raise_hint

    layers: list[_Layer] = []
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    if not tokens:
        raise ModelError(f"empty model spec {spec!r}; {SPEC_HELP}")
    matches = [(_TOKEN.match(token), token) for token in tokens]
    for m, token in matches:
        if m is None:
            raise ModelError(f"bad token {token[:40]!r} in model spec {spec[:80]!r}; {SPEC_HELP}")
    checked = cast(list[tuple[re.Match[str], str]], matches)  # none is None now
    count = sum(int(m["rep"] or 1) for m, _ in checked)
    cap = limits().model_layers
    if count > cap:
        raise ModelError(
            f"model spec {spec[:80]!r} has {count:,} layers, more than cnnlab builds ({cap:,}); "
            f"{raise_hint('model_layers')} if you mean it"
        )
    for m, token in checked:
        if m["conv"]:
            k, s = int(m["k"] or 3), int(m["s"] or 1)
            if int(m["conv"]) < 1 or k < 1 or s < 1:
                raise ModelError(f"bad token {token!r} in model spec {spec!r}: sizes must be >= 1")
            layer = _Layer("conv", int(m["conv"]), k, s, bool(m["bn"]))
            layers += [layer] * int(m["rep"] or 1)
        elif m["pool"]:
            k = int(m["pk"] or 2)
            layers.append(_Layer("maxpool" if m["pool"] == "p" else "avgpool", kernel=k, stride=k))
        elif m["fc"]:
            layers.append(_Layer("fc", int(m["fc"])))
        elif m["drop"]:
            layers.append(_Layer("dropout", p=float(m["drop"])))
        else:
            layers.append(_Layer("gap"))
    return layers


def spec_values(spec: str, num_classes: int = 10, in_channels: int = 3, input_size: int | tuple[int, int] = 32) -> int:
    """The number of values in the state dict of `cnn(spec, ...)` (parameters and batch-norm buffers), from the
    spec alone: a weights sidecar is checked with it before any module is built."""
    c, (h, w) = in_channels, _pair(input_size)
    flat, values = None, 0
    for layer in parse_spec(spec):
        if layer.kind == "conv":
            values += c * layer.size * layer.kernel**2 + (4 * layer.size + 1 if layer.batchnorm else layer.size)
            if layer.stride > 1:
                h = (h + 2 * (layer.kernel // 2) - layer.kernel) // layer.stride + 1
                w = (w + 2 * (layer.kernel // 2) - layer.kernel) // layer.stride + 1
            c = layer.size
        elif layer.kind in ("maxpool", "avgpool"):
            h, w = h // layer.stride, w // layer.stride
        elif layer.kind == "gap":
            h = w = 1
        elif layer.kind == "fc":
            flat = c * h * w if flat is None else flat
            values += (flat + 1) * layer.size
            flat = layer.size
    flat = c * h * w if flat is None else flat
    return values + (flat + 1) * num_classes


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class TraditionalCNN(nn.Sequential):
    """conv + ReLU stages, pooling, then dense layers, as one `nn.Sequential` (keys `0.weight`, ...).

    The flatten size follows from `in_channels` and `input_size`: nothing is tied to one dataset.
    """

    def __init__(
        self,
        spec: str = CONVNET_SPEC,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int | tuple[int, int] = 32,
    ):
        layers = parse_spec(spec)
        if num_classes < 1 or in_channels < 1:
            raise ModelError(f"num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}")
        c, (h, w) = in_channels, _pair(input_size)
        modules: list[nn.Module] = []
        flat: int | None = None  # set once the feature maps are flattened
        for layer in layers:
            if layer.kind in ("conv", "maxpool", "avgpool", "gap") and flat is not None:
                raise ModelError(f"model spec {spec!r}: a {layer.kind} layer cannot follow a dense layer")
            if layer.kind == "conv":
                # 'same' keeps the size at stride 1, as the lecture writes it; strided convs pad k//2.
                pad = "same" if layer.stride == 1 else layer.kernel // 2
                modules.append(
                    nn.Conv2d(c, layer.size, layer.kernel, stride=layer.stride, padding=pad, bias=not layer.batchnorm)
                )
                if layer.batchnorm:
                    modules.append(nn.BatchNorm2d(layer.size))
                modules.append(nn.ReLU(inplace=True))
                if layer.stride > 1:
                    h = (h + 2 * (layer.kernel // 2) - layer.kernel) // layer.stride + 1
                    w = (w + 2 * (layer.kernel // 2) - layer.kernel) // layer.stride + 1
                c = layer.size
            elif layer.kind in ("maxpool", "avgpool"):
                pool = nn.MaxPool2d if layer.kind == "maxpool" else nn.AvgPool2d
                modules.append(pool(layer.kernel, layer.stride))
                h, w = h // layer.stride, w // layer.stride
            elif layer.kind == "gap":
                modules.append(nn.AdaptiveAvgPool2d(1))
                h = w = 1
            elif layer.kind == "dropout":
                modules.append(nn.Dropout(layer.p))
            else:  # fc
                if flat is None:
                    modules.append(nn.Flatten())
                    flat = c * h * w
                modules += [nn.Linear(flat, layer.size), nn.ReLU(inplace=True)]
                flat = layer.size
            if h < 1 or w < 1:
                raise ModelError(
                    f"model spec {spec!r} shrinks a {_pair(input_size)} input to nothing; "
                    "use fewer pooling or strided layers or a larger input_size"
                )
        if flat is None:
            modules.append(nn.Flatten())
            flat = c * h * w
        modules.append(nn.Linear(flat, num_classes))
        super().__init__(*modules)
        self.spec, self.num_classes, self.in_channels = spec, num_classes, in_channels
        self.input_size = _pair(input_size)
        self._head_start = next(i for i, m in enumerate(modules) if isinstance(m, nn.Flatten))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for module in list(self)[: self._head_start]:
            x = module(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        for module in list(self)[self._head_start :]:
            x = module(x)
        return x


class ConvNet(nn.Module):
    """The lecture's "alternate version": the same network as a module class with its own `forward`."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int | tuple[int, int] = 32):
        super().__init__()
        h, w = _pair(input_size)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, 5, 3, padding="same")
        self.conv2 = nn.Conv2d(5, 5, 3, padding="same")
        self.pool = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(5, 8, 3, padding="same")
        self.conv4 = nn.Conv2d(8, 8, 3, padding="same")
        self.flatten = nn.Flatten()
        self.fc = nn.Linear((h // 2) * (w // 2) * 8, 128)  # 16*16*8 at 32x32, 14*14*8 at 28x28
        self.out = nn.Linear(128, num_classes)
        self.num_classes, self.in_channels, self.input_size = num_classes, in_channels, (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.pool(x)  # (N, 5, H, W) -> (N, 5, H/2, W/2)
        x = self.relu(self.conv3(x))
        x = self.relu(self.conv4(x))
        x = self.flatten(x)
        x = self.relu(self.fc(x))
        return self.out(x)


def sequential_to_convnet_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the `nn.Sequential` form's keys (`0.weight`, ...) to the `ConvNet` class's (`conv1.weight`, ...)."""
    names = {"0": "conv1", "2": "conv2", "5": "conv3", "7": "conv4", "10": "fc", "12": "out"}
    return {f"{names[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in state.items()}


@register_model
def convnet(num_classes: int = 10, in_channels: int = 3, input_size: int | tuple[int, int] = 32) -> TraditionalCNN:
    """The lecture's Complete Network as `nn.Sequential` (264,884 parameters at 3x32x32, 10 classes)."""
    return TraditionalCNN(CONVNET_SPEC, num_classes=num_classes, in_channels=in_channels, input_size=input_size)


@register_model
def convnet_module(num_classes: int = 10, in_channels: int = 3, input_size: int | tuple[int, int] = 32) -> ConvNet:
    """The lecture's Complete Network as a module class with a hand-written `forward`."""
    return ConvNet(num_classes=num_classes, in_channels=in_channels, input_size=input_size)


@register_model
def cnn(
    spec: str = CONVNET_SPEC, num_classes: int = 10, in_channels: int = 3, input_size: int | tuple[int, int] = 32
) -> TraditionalCNN:
    """A traditional CNN of your own from a short spec, e.g. ``cnn(spec="c32x2,p,c64x2,p,f256")``."""
    return TraditionalCNN(spec, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
