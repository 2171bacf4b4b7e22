"""airbench94 (Keller Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU", arXiv 2404.00498, 2024):
94.01% mean test accuracy over 1,000 runs in 3.83 s on one A100 (3.29 s with torch.compile).

The net: a frozen 2x2 patch-whitening conv with a trained bias, GELU, three blocks of conv-pool-BN-GELU-
conv-BN-GELU at widths 64/256/256, global max pooling, a linear layer without bias and a fixed 1/9 output
scale. Batch norm learns only its shift. Facts and figures are from the paper and its public code
(KellerJordan/cifar10-airbench, airbench94.py); the code here is cnnlab's own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import ModelError
from .registry import register_model

__all__ = [
    "Airbench",
    "ConvGroup",
    "WhiteningConv",
    "ShiftOnlyBatchNorm",
    "init_whitening",
    "airbench94_param_groups",
    "AIRBENCH94_RECIPE",
    "airbench94",
]

# The training recipe of airbench94.py, for cnnlab.training.recipes to follow (the paper's numbers, the code's `hyp` names).
AIRBENCH94_RECIPE: dict[str, Any] = {
    "dataset": "cifar10",
    # hyp['aug'] = {flip, translate: 2}: a random translation by up to 2 pixels with reflection padding, which is
    # exactly RandomCrop(2, "reflect"), then the paper's alternating flip (derandomised horizontal flipping).
    "augment": "crop:2:reflect,altflip",
    "batch_size": 1024,  # hyp['opt']['batch_size']; drop_last: 48 steps per epoch on 50,000 images
    "epochs": 9.9,  # hyp['opt']['train_epochs']: ceil(9.9 * 48) = 476 steps; the 10th epoch stops after 44
    "optimizer": "sgd",  # torch.optim.SGD(..., nesterov=True)
    "nesterov": True,
    "momentum": 0.85,  # hyp['opt']['momentum']
    # Decoupled learning rate "per 1024 examples": PyTorch's lr is 11.5 / (1024 * (1 + 1 / (1 - momentum)))
    # per example with a loss summed over the batch, i.e. 1.5 for a batch-mean loss at 1024 images.
    "lr": 11.5,
    # Decoupled weight decay "per 1024 examples": each step shrinks every trainable tensor (biases and BN
    # shifts included) by lr_factor * 0.0153 * batch_size / (1024 * (1 + 1 / (1 - momentum))).
    "weight_decay": 0.0153,
    "bias_scaler": 64.0,  # BN shifts get 64x the learning rate, not 64x the decay (hyp['opt']['bias_scaler'])
    "loss_reduction": "sum",  # per-example losses summed: nn.CrossEntropyLoss(reduction='none')(...).sum()
    "label_smoothing": 0.2,  # hyp['opt']['label_smoothing']
    # lr factor per step: linear from 0.2 at step 0 to 1.0 at step int(0.23 * total_steps), then linear to 0.07
    # at step total_steps (airbench94.py's triangle(total_train_steps, start=0.2, end=0.07, peak=0.23)).
    "lr_start": 0.2,
    "lr_peak_fraction": 0.23,
    "lr_end": 0.07,
    # Lookahead (hyp['opt']['ema']): from epoch 3 (0-based) on, every 5th step; the first such step snapshots the
    # weights, each later one moves the snapshot towards the net by (1 - decay) with
    # decay = 0.95**5 * (step / total_steps)**3 and copies it back into the net; at the end of every epoch
    # after the snapshot exists the snapshot is copied back once more.
    "ema_start_epoch": 3,
    "ema_every_steps": 5,
    "ema_decay_base": 0.95,
    "ema_decay_power": 3.0,
    "whiten_bias_epochs": 3,  # the whitening conv's bias trains in epochs 0-2 only (hyp['opt']['whiten_bias_epochs'])
    "whiten_images": 5000,  # the whitening is computed from the first 5,000 training images
    "whiten_eps": 5e-4,  # added to each eigenvalue before 1/sqrt (init_whitening_conv's eps)
    "tta_level": 2,  # hyp['net']['tta_level']: image, mirror and two 1-pixel translations (inference/tta.py)
    "paper_test_accuracy": 0.9401,  # mean over 1,000 runs, with TTA level 2
    "paper_seconds_a100": 3.83,  # airbench94.py, uncompiled; 3.29 s with torch.compile
}

# hyp['net']: batchnorm_momentum 0.6 in the paper's convention (running = 0.6 * running + 0.4 * batch), which
# is PyTorch's momentum=0.4; eps 1e-12; the logits are multiplied by scaling_factor 1/9.
BN_MOMENTUM = 0.4
BN_EPS = 1e-12
LOGIT_SCALE = 1 / 9


class ShiftOnlyBatchNorm(nn.BatchNorm2d):
    """Batch norm whose scale stays 1: `weight` is a buffer of ones, so no optimiser or weight decay sees it.

    The state-dict keys are nn.BatchNorm2d's (weight, bias, running_mean, running_var, num_batches_tracked).
    """

    def __init__(self, num_features: int, momentum: float = BN_MOMENTUM, eps: float = BN_EPS):
        super().__init__(num_features, eps=eps, momentum=momentum)
        del self.weight
        self.register_buffer("weight", torch.ones(num_features))


class WhiteningConv(nn.Conv2d):
    """A kxk conv without padding whose 2*C*k*k filters whiten the image's kxk patches (`init_whitening`).

    The filters are a buffer (frozen, unseen by optimisers); only the bias is a parameter.
    """

    def __init__(self, in_channels: int, kernel_size: int = 2):
        super().__init__(in_channels, 2 * in_channels * kernel_size**2, kernel_size, bias=True)
        weight = self.weight.detach().clone()
        del self.weight
        self.register_buffer("weight", weight)
        assert self.bias is not None  # bias=True above
        nn.init.zeros_(self.bias)


class ConvGroup(nn.Module):
    """conv3x3 - maxpool 2x2 - BN - GELU - conv3x3 - BN - GELU, airbench's block (no shortcut)."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float = BN_MOMENTUM, bn_eps: float = BN_EPS):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = ShiftOnlyBatchNorm(out_channels, bn_momentum, bn_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = ShiftOnlyBatchNorm(out_channels, bn_momentum, bn_eps)
        self.act = nn.GELU()
        for conv in (self.conv1, self.conv2):
            # the paper's partial identity init: the first in_channels filters pass their input through unchanged
            with torch.no_grad():
                nn.init.dirac_(conv.weight[: conv.in_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))  # the conv runs before the pool: (H, W) -> (H/2, W/2)
        return self.act(self.norm2(self.conv2(x)))


class Airbench(nn.Module):
    """Whitening conv, GELU, three ConvGroups, global max pool, linear (no bias), logits scaled by 1/9.

    At 32x32 the groups see 31 -> 15 -> 7 -> 3 pixels and the global max pool is the paper's MaxPool2d(3);
    any side from 9 pixels up works.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (64, 256, 256),
        whiten_kernel: int = 2,
        logit_scale: float = LOGIT_SCALE,
    ):
        super().__init__()
        if num_classes < 1 or in_channels < 1 or len(widths) != 3 or min(widths) < 1:
            raise ModelError(
                f"num_classes {num_classes}, in_channels {in_channels} and three widths {widths} must all be >= 1"
            )
        self.whiten = WhiteningConv(in_channels, whiten_kernel)
        self.act = nn.GELU()
        self.layer1 = ConvGroup(self.whiten.out_channels, widths[0])
        self.layer2 = ConvGroup(widths[0], widths[1])
        self.layer3 = ConvGroup(widths[1], widths[2])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes, bias=False)
        self.logit_scale = logit_scale
        self.num_classes, self.in_channels, self.input_size = num_classes, in_channels, (32, 32)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.whiten(x))  # (N, C, 32, 32) -> (N, 24, 31, 31)
        return self.layer3(self.layer2(self.layer1(x)))  # -> (N, 256, 3, 3)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1)) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- what cnnlab's trainer asks a model that needs more than its weights' initialisation -------------------
    def prepare(self, train_images: torch.Tensor, mean, std) -> str:
        """Before training: the whitening filters from the training images (the paper's first 5,000)."""
        n = min(AIRBENCH94_RECIPE["whiten_images"], len(train_images))
        init_whitening(self, train_images, mean, std, num_images=n, eps=AIRBENCH94_RECIPE["whiten_eps"])
        return f"whitening filters computed from the 2x2 patches of {n:,} training images"

    def param_groups(self, *, batch_size: int, lr: float, weight_decay: float, momentum: float) -> list[dict]:
        """The paper's optimiser groups for a batch-mean loss, with `lr` and `weight_decay` in the paper's units
        (per 1024 examples); the whitening bias in a group of its own that trains for the first epochs only."""
        recipe = {**AIRBENCH94_RECIPE, "lr": lr, "weight_decay": weight_decay, "momentum": momentum}
        shifts, rest = airbench94_param_groups(self, batch_size=batch_size, loss_reduction="mean", recipe=recipe)
        bias = self.whiten.bias
        rest = {**rest, "params": [q for q in rest["params"] if q is not bias]}
        whiten = {
            **rest,
            "params": [bias],
            "name": "whitening_bias",
            "until_epoch": AIRBENCH94_RECIPE["whiten_bias_epochs"],
        }
        return [shifts, rest, whiten]


@torch.no_grad()
def init_whitening(
    model: nn.Module, images: torch.Tensor, mean, std, *, num_images: int = 5000, eps: float = 5e-4, chunk: int = 500
) -> torch.Tensor:
    """Set the whitening conv from the first `num_images` uint8 (N, C, H, W) training images, normalised by
    mean/std as the loader does: filters V^T / sqrt(eigenvalues + eps) and their negatives, where V holds the
    eigenvectors of the kxk patches' second-moment matrix, largest eigenvalue first. Returns the eigenvalues.
    """
    layer = model.whiten if isinstance(getattr(model, "whiten", None), WhiteningConv) else model
    if not isinstance(layer, WhiteningConv):
        raise ModelError(f"init_whitening needs an airbench model or a WhiteningConv, not {type(model).__name__}")
    c, (kh, kw) = layer.in_channels, layer.kernel_size
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != c or min(images.shape[2:]) < max(kh, kw):
        raise ModelError(
            f"init_whitening needs uint8 images of shape (N, {c}, H, W) with H, W >= {max(kh, kw)}, "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    images = images[:num_images]
    if len(images) == 0:
        raise ModelError("init_whitening got no images")
    device = layer.weight.device
    mean_t = torch.as_tensor(mean, dtype=torch.float64, device=device).reshape(1, c, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float64, device=device).reshape(1, c, 1, 1)
    moment = torch.zeros(c * kh * kw, c * kh * kw, dtype=torch.float64, device=device)
    count = 0
    for part in images.split(chunk):
        x = (part.to(device).double() / 255 - mean_t) / std_t
        # every kxk window as a row laid out (C, kh, kw), the conv weight's layout
        patches = x.unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)
        moment += patches.T @ patches
        count += len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(moment / count)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    filters = (eigenvectors.T / (eigenvalues.clamp_min(0) + eps).sqrt()[:, None]).reshape(-1, c, kh, kw)
    # with the negatives, GELU downstream keeps both signs of every whitened component
    layer.weight.copy_(torch.cat([filters, -filters]).to(layer.weight.dtype))
    return eigenvalues.float().cpu()


def airbench94_param_groups(
    model: nn.Module, *, batch_size: int = 1024, loss_reduction: str = "mean", recipe: dict = AIRBENCH94_RECIPE
) -> list[dict]:
    """torch.optim.SGD parameter groups with the paper's learning rates and weight decays: BN shifts, then the
    rest (every other trainable tensor, biases included). `base_lr` is the lr that the schedule's factor scales.

    With loss_reduction "mean" the numbers are rescaled so that each step equals the paper's summed-loss step.
    """
    if loss_reduction not in ("mean", "sum"):
        raise ModelError(f"loss_reduction {loss_reduction!r}: choose 'mean' or 'sum'")
    momentum = recipe["momentum"]
    kilostep = 1024 * (1 + 1 / (1 - momentum))  # Nesterov's steady-state step gain, per 1024 examples
    lr = recipe["lr"] / kilostep * (batch_size if loss_reduction == "mean" else 1)
    decay_per_step = recipe["weight_decay"] * batch_size / kilostep  # PyTorch multiplies weight_decay by lr
    shifts = [
        m.bias
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None and m.bias.requires_grad
    ]
    taken = {id(p) for p in shifts}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    bias_lr = lr * recipe["bias_scaler"]
    return [
        {
            "params": shifts,
            "lr": bias_lr,
            "base_lr": bias_lr,
            "weight_decay": decay_per_step / bias_lr,
            "name": "norm_biases",
        },
        {"params": rest, "lr": lr, "base_lr": lr, "weight_decay": decay_per_step / lr, "name": "other"},
    ]


@register_model
def airbench94(num_classes: int = 10, in_channels: int = 3) -> Airbench:
    """airbench94 (Jordan 2024, arXiv 2404.00498): 1,971,352 trained parameters, 118.1 M MACs at 3x32x32."""
    return Airbench(num_classes=num_classes, in_channels=in_channels)
