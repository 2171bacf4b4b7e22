"""Residual networks for ImageNet-sized input (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016), with torchvision's module names so its checkpoint files load with `strict=True`.

The bottleneck puts its stride on the 3x3 conv as torchvision does ("ResNet v1.5");
`stride_in_1x1=True` gives the paper's original placement on the first 1x1 conv.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..errors import ModelError
from .registry import register_model

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "PadShortcut",
    "make_shortcut",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "resnext50_32x4d",
    "resnet18_small_stem",
]

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A: identity, subsampled by the stride and zero-padded to the new channel count (no parameters)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.extra, self.stride = out_planes - in_planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (N, C, H, W) -> (N, C, H/s, W/s)
        return nn.functional.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def make_shortcut(
    option: str | None, in_planes: int, out_planes: int, stride: int, norm_layer: NormLayer
) -> nn.Module | None:
    """The paper's shortcut options: A (pad), B (project where the shape changes), C (project everywhere).

    Returns the module stored as `downsample` (None: plain identity).
    """
    changes = stride != 1 or in_planes != out_planes
    if option == "A" and changes:
        return PadShortcut(in_planes, out_planes, stride)
    if (option == "B" and changes) or option == "C":
        return nn.Sequential(conv1x1(in_planes, out_planes, stride), norm_layer(out_planes))
    if option not in ("A", "B", "C", None):
        raise ModelError(f"shortcut {option!r} is not one of 'A', 'B', 'C' (or None for a plain network)")
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convs; the shortcut adds the block's input (He et al. 2016, Fig. 2)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: NormLayer = nn.BatchNorm2d,
        residual: bool = True,
        stride_in_1x1: bool = False,
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ModelError("BasicBlock supports only groups=1 and width_per_group=64; use a Bottleneck network")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))  # (N, planes, H/stride, W/stride)
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (identity if self.downsample is None else self.downsample(identity))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 restore to 4x the width (He et al. 2016, Fig. 5)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        norm_layer: NormLayer = nn.BatchNorm2d,
        residual: bool = True,
        stride_in_1x1: bool = False,
    ):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, width, s1)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, s3, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))  # (N, width, H/stride, W/stride)
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (identity if self.downsample is None else self.downsample(identity))
        return self.relu(out)


def zero_init_last_bn(model: nn.Module) -> None:
    """Start each residual branch at zero so every block begins as the identity (Goyal et al. 2017)."""
    for m in model.modules():
        if isinstance(m, (Bottleneck, BasicBlock)):
            last = m.bn3 if isinstance(m, Bottleneck) else m.bn2
            assert isinstance(last.weight, torch.Tensor), "zero_init_residual needs a norm layer with a weight"
            nn.init.zeros_(last.weight)


def init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """The ImageNet ResNet: 7x7 stem, max-pool, four stages of blocks at widths 64..512, global pool, fc.

    `stem="small"` replaces the stem with one 3x3 stride-1 conv and no max-pool, as CIFAR code often
    does with ImageNet widths; it is not the paper's CIFAR network (see `cifar_resnet.py`).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: NormLayer | None = None,
        stem: str = "imagenet",
        shortcut: str = "B",
        stride_in_1x1: bool = False,
    ):
        super().__init__()
        if stem not in ("imagenet", "small"):
            raise ModelError(f"stem {stem!r} is not 'imagenet' or 'small'")
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes, self.groups, self.base_width = 64, groups, width_per_group
        self.block_kwargs = {"stride_in_1x1": stride_in_1x1}
        self.shortcut = shortcut
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = self._norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.num_classes, self.in_channels = num_classes, in_channels
        self.input_size = (224, 224) if stem == "imagenet" else (32, 32)  # native size, for summaries
        init_weights(self)
        if zero_init_residual:
            zero_init_last_bn(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            downsample = make_shortcut(self.shortcut, self.inplanes, planes * block.expansion, s, self._norm_layer)
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    s,
                    downsample,
                    self.groups,
                    self.base_width,
                    self._norm_layer,
                    **self.block_kwargs,
                )
            )
            self.inplanes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, H/4, W/4) with the ImageNet stem
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18 (He et al. 2016): 11,689,512 parameters at 1000 classes."""
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    """ResNet-34 (He et al. 2016), the lecture's example: 21,797,672 parameters."""
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (He et al. 2016), bottleneck blocks: 25,557,032 parameters."""
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (He et al. 2016): 44,549,160 parameters."""
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


@register_model
def resnet152(**kwargs) -> ResNet:
    """ResNet-152 (He et al. 2016): 60,192,808 parameters."""
    return ResNet(Bottleneck, [3, 8, 36, 3], **kwargs)


@register_model
def wide_resnet50_2(**kwargs) -> ResNet:
    """Wide ResNet-50-2 (Zagoruyko & Komodakis 2016): bottlenecks twice as wide."""
    return ResNet(Bottleneck, [3, 4, 6, 3], width_per_group=128, **kwargs)


@register_model
def resnext50_32x4d(**kwargs) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al. 2017): 32 groups of width 4 in each bottleneck."""
    return ResNet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, **kwargs)


@register_model
def resnet18_small_stem(num_classes: int = 10, **kwargs) -> ResNet:
    """ResNet-18 with a 3x3 stride-1 stem, no max-pool, for 32x32 input (not the paper's CIFAR net): 11,173,962."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, stem="small", **kwargs)
