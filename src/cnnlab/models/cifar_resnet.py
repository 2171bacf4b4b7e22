"""The CIFAR-10 ResNets of He et al. 2016, Sec. 4.2: depth 6n+2, widths 16/32/64, and their plain twins.

A plain net is the residual class with its shortcuts switched off (`shortcut=None`), not a copy.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ModelError
from .registry import register_model
from .resnet import BasicBlock, NormLayer, init_weights, make_shortcut, zero_init_last_bn

__all__ = (
    ["CifarResNet", "cifar_resnet", "cifar_plain"]
    + [f"resnet{d}" for d in (20, 32, 44, 56, 110, 1202)]
    + [f"plain{d}" for d in (20, 32, 44, 56, 110)]
)


class CifarResNet(nn.Module):
    """3x3 conv with 16 filters, three stages of n basic blocks at 16, 32, 64 filters, global pool, fc."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: str | None = "A",
        norm_layer: NormLayer | None = None,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ModelError(f"depth {depth} is not 6n+2 (20, 32, 44, 56, 110, 1202, ...)")
        n = (depth - 2) // 6
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = norm_layer(16)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = 16
        self.layer1 = self._make_layer(16, n, 1, shortcut, norm_layer)
        self.layer2 = self._make_layer(32, n, 2, shortcut, norm_layer)  # 32x32 -> 16x16
        self.layer3 = self._make_layer(64, n, 2, shortcut, norm_layer)  # 16x16 -> 8x8
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self.num_classes, self.in_channels, self.input_size = num_classes, in_channels, (32, 32)
        self.depth, self.shortcut = depth, shortcut
        init_weights(self)
        if zero_init_residual:
            zero_init_last_bn(self)

    def _make_layer(
        self, planes: int, blocks: int, stride: int, shortcut: str | None, norm_layer: NormLayer
    ) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            downsample = make_shortcut(shortcut, self.inplanes, planes, s, norm_layer)
            layers.append(
                BasicBlock(self.inplanes, planes, s, downsample, norm_layer=norm_layer, residual=shortcut is not None)
            )
            self.inplanes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _residual(depth: int, params: str):
    def builder(shortcut: str = "A", **kwargs) -> CifarResNet:
        return CifarResNet(depth, shortcut=shortcut, **kwargs)

    builder.__name__ = builder.__qualname__ = f"resnet{depth}"
    builder.__doc__ = f"ResNet-{depth} for CIFAR (He et al. 2016, Sec. 4.2): {params} parameters with option A."
    return register_model(builder)


def _plain(depth: int):
    def builder(**kwargs) -> CifarResNet:
        return CifarResNet(depth, shortcut=None, **kwargs)

    builder.__name__ = builder.__qualname__ = f"plain{depth}"
    builder.__doc__ = f"Plain-{depth} (He et al. 2016, Sec. 4.2): ResNet-{depth} without shortcuts."
    return register_model(builder)


resnet20 = _residual(20, "269,722")
resnet32 = _residual(32, "464,154")
resnet44 = _residual(44, "658,586")
resnet56 = _residual(56, "853,018")
resnet110 = _residual(110, "1,727,962")
resnet1202 = _residual(1202, "19,421,274")
plain20, plain32, plain44, plain56, plain110 = (_plain(d) for d in (20, 32, 44, 56, 110))


@register_model
def cifar_resnet(depth: int = 20, shortcut: str = "A", **kwargs) -> CifarResNet:
    """CIFAR ResNet of any depth 6n+2 (`--model-arg depth=8`), He et al. 2016, Sec. 4.2."""
    return CifarResNet(depth, shortcut=shortcut, **kwargs)


@register_model
def cifar_plain(depth: int = 20, **kwargs) -> CifarResNet:
    """Plain CIFAR net of any depth 6n+2 (`--model-arg depth=8`): the ResNet without shortcuts."""
    return CifarResNet(depth, shortcut=None, **kwargs)
