"""Optimisers and learning-rate schedules.

A schedule is a pure function of the step number, so the scheduler's whole state is the step
count: nothing to pickle, and a resumed run computes exactly the same learning rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn as nn

__all__ = ["param_groups", "build_optimizer", "build_training_optimizer", "build_schedule", "applied_lrs"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on weight matrices and conv kernels (dim >= 2), never on biases or norm scales."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    groups: list[dict] | None = None,
) -> torch.optim.Optimizer:
    """SGD or AdamW over `groups` (default: weight decay on dim >= 2 tensors only). A group may carry
    `lr_scale` (its learning rate relative to the schedule's) and `until_epoch` (frozen from that epoch)."""
    groups = groups if groups is not None else param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise ValueError(f"unknown optimizer {name!r}; choices: sgd, adamw")


def build_schedule(
    name: str,
    lr: float,
    total_steps: int,
    *,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    warmup_lr: float = 0.0,
    warmup: str = "linear",
    milestones: list | tuple = (),
    milestone_unit: str = "epoch",
    gamma: float = 0.1,
    lr_start_factor: float = 0.04,
    lr_peak_fraction: float = 0.25,
    lr_end_factor: float = 0.0,
) -> Callable[[int], float]:
    """Return lr_at(step) for step = 0 .. total_steps - 1."""
    total_steps = max(total_steps, 1)

    warmup_mode, warmup_steps = warmup, int(round(warmup_epochs * steps_per_epoch))

    def warmed(step: int, after: Callable[[int], float]) -> float:
        if step < warmup_steps:
            if warmup_mode == "constant":  # He et al. 2016 warm ResNet-110 up at 0.01 for about 400 iterations
                return warmup_lr
            return warmup_lr + (after(warmup_steps) - warmup_lr) * step / warmup_steps  # linear to the schedule's value
        return after(step)

    if name == "onecycle":
        # Linear up from lr * start over the first peak fraction of the steps, then linearly down to lr * end
        # (Smith & Topin 2017; by default from lr/25 over 25% to 0; airbench94: 0.2, 23%, 0.07).
        peak = max(int(lr_peak_fraction * total_steps), 1)

        def onecycle(step: int) -> float:
            if step < peak:
                return lr * (lr_start_factor + (1 - lr_start_factor) * step / peak)
            down = min((step - peak) / max(total_steps - peak, 1), 1.0)
            return lr * (1 - (1 - lr_end_factor) * down)

        return onecycle
    if name == "cosine":

        def cosine(step: int) -> float:
            progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
            return 0.5 * lr * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))

        return lambda step: warmed(step, cosine)
    if name == "multistep":
        scale = {"epoch": steps_per_epoch, "iteration": 1, "fraction": total_steps}[milestone_unit]
        boundaries = sorted(int(round(m * scale)) for m in milestones)

        def multistep(step: int) -> float:
            return lr * gamma ** sum(step >= b for b in boundaries)

        return lambda step: warmed(step, multistep)
    if name == "constant":
        return lambda step: warmed(step, lambda _: lr)
    raise ValueError(f"unknown schedule {name!r}; choices: onecycle, cosine, multistep, constant")


def applied_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rates the optimiser applies now, as metrics.csv and the loggers record them: `lr` for its largest
    group (the weights), and `lr/<group>` for every group when they differ (airbench94's per-group rates, a group
    that stopped training)."""
    groups = optimizer.param_groups
    main = max(groups, key=lambda g: sum(p.numel() for p in g["params"]))
    out = {"lr": float(main["lr"])}
    if len({float(g["lr"]) for g in groups}) > 1:
        out.update({f"lr/{g.get('name', f'group{i}')}": float(g["lr"]) for i, g in enumerate(groups)})
    return out


def build_training_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    param_groups: str = "default",
    batch_size: int = 128,
    model_name: str = "",
) -> torch.optim.Optimizer:
    """`name` over the default parameter groups, or the model's own (param_groups "model": airbench94's), each
    group's learning rate relative to the schedule's (its lr_scale)."""
    from ..errors import ConfigError

    groups = None
    if param_groups == "model":
        if not hasattr(model, "param_groups"):
            raise ConfigError(
                f"--param-groups model: {model_name or type(model).__name__} defines no parameter "
                "groups of its own; leave out --param-groups (airbench94 has them)"
            )
        groups = cast(Any, model).param_groups(
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, momentum=momentum
        )
        for group in groups:
            group["lr_scale"] = group["lr"] / lr
    return build_optimizer(
        model, name, lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, groups=groups
    )
