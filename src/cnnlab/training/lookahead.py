"""Lookahead of the weights as airbench94 does it (Jordan 2024, arXiv 2404.00498; Zhang et al. 2019).

From `start_epoch` on, every `every` steps: the first time, snapshot every floating-point tensor of the
model's state (weights and batch-norm statistics); afterwards move the snapshot towards the weights by
(1 - decay), with decay = 0.95**every * (step / total_steps)**3, and copy it back into the model. The
weights then follow a slow average that tightens as training ends. At each epoch's end the snapshot is
copied back once more.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.airbench import AIRBENCH94_RECIPE

__all__ = ["Lookahead"]

# per step, airbench94's hyp['opt']['ema']['decay_per_step']; the decay grows as (step / total)^3: little averaging
# early, much at the end
DECAY_BASE, RAMP_POWER = AIRBENCH94_RECIPE["ema_decay_base"], AIRBENCH94_RECIPE["ema_decay_power"]


class Lookahead:
    def __init__(self, model: nn.Module, every: int, start_epoch: float, total_steps: int):
        self.model, self.every, self.start_epoch, self.total_steps = model, every, start_epoch, total_steps
        self.snapshot: dict[str, torch.Tensor] | None = None

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def after_step(self, step: int, epoch: int) -> None:
        """Called after optimiser step number `step` (counted from 1) of 0-based `epoch`."""
        if epoch < self.start_epoch or step % self.every:
            return
        current = self._tensors()
        if self.snapshot is None:
            self.snapshot = {k: v.detach().clone() for k, v in current.items()}
            return
        decay = DECAY_BASE**self.every * (step / self.total_steps) ** RAMP_POWER
        for key, value in current.items():
            self.snapshot[key].lerp_(value, 1 - decay)
            value.copy_(self.snapshot[key])

    @torch.no_grad()
    def end_epoch(self) -> None:
        if self.snapshot is not None:
            for key, value in self._tensors().items():
                value.copy_(self.snapshot[key])

    def state_dict(self) -> dict:
        return {"snapshot": self.snapshot}

    def load_state_dict(self, state: dict) -> None:
        snapshot = state.get("snapshot")
        device = next(self.model.parameters()).device
        self.snapshot = None if snapshot is None else {k: v.to(device) for k, v in snapshot.items()}
