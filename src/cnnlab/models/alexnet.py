"""AlexNet (Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional Neural Networks",
NeurIPS 2012) in torchvision's single-tower layout, with its module names so its checkpoint files load with
`strict=True`.

torchvision's version follows Krizhevsky's "One weird trick" paper (2014): 64/192/384/256/256 conv channels
instead of the original 96/256/384/384/256 split over two GPUs, no local response normalisation.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ModelError
from .registry import register_model

__all__ = ["AlexNet", "alexnet"]


class AlexNet(nn.Module):
    """Five convs (11x11/4, 5x5, three 3x3) with three max-pools, a 6x6 average pool, three dense layers."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"dropout {dropout} is not a probability in [0, 1)")
        # Indices in these Sequentials are the state-dict keys (features.0, classifier.1, ...): keep them.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2),  # 224 -> 55
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 55 -> 27, overlapping windows (Sec. 3.4)
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 27 -> 13
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # 13 -> 6
        )
        # 6x6 at 224x224 input already; the adaptive pool lets other sizes (>= 63x63) reach the same 9216 features
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )
        self.num_classes, self.in_channels = num_classes, in_channels
        self.input_size = (224, 224)  # native size, for summaries

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (N, 256, 6, 6) at 224x224

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(x), 1))  # (N, 9216) -> (N, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def alexnet(**kwargs) -> AlexNet:
    """AlexNet (Krizhevsky et al. 2012), torchvision's layout: 61,100,840 parameters at 1000 classes."""
    return AlexNet(**kwargs)
