"""`TrainState`: everything a checkpoint saves, so that a resumed run continues bit for bit (on CPU).

It holds only tensors, numbers, strings and plain containers once turned into a state dict, so the
checkpoint loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn

__all__ = ["TrainState", "rng_state", "set_rng_state", "EpochSums"]


@dataclass
class EpochSums:
    """Running sums of the current epoch's training loss and accuracy, carried across a mid-epoch resume."""

    loss: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0

    def state_dict(self) -> dict:
        return {"loss": self.loss, "correct": self.correct, "seen": self.seen, "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict) -> EpochSums:
        return cls(float(state["loss"]), int(state["correct"]), int(state["seen"]), float(state["seconds"]))


def rng_state(device: torch.device) -> dict:
    """This process's global generators: torch (CPU, and the one CUDA device in use), Python, NumPy."""
    version, mt, gauss = random.getstate()
    # the legacy tuple (legacy=True is the default; numpy's stub types a bare call as the dict)
    _, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if device.type == "cuda":  # only the device this process trains on, not every GPU the machine has
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> str | None:
    """Restore `rng_state`'s output; returns a note when the CUDA generator could not be carried over."""
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda":
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
            return None
        return "the checkpoint was written without CUDA; the CUDA generator starts from the seed"
    if "cuda" in state:
        return "the checkpoint holds a CUDA generator state, unused on this device"
    return None


@dataclass
class TrainState:
    """The model, optimiser, schedule position, data order and bookkeeping of a run in progress."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: Any  # InMemoryLoader or a streaming loader: anything with epoch, position and state_dict()
    step: int = 0
    history: list = field(default_factory=list)  # metrics.csv rows so far
    sums: EpochSums = field(default_factory=EpochSums)
    nan_skipped: int = 0
    extras: dict = field(default_factory=dict)  # objects with after_step() and a state dict (the lookahead)
    notes: dict = field(default_factory=dict)  # plain JSON values: wall clock, times to accuracy

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"step": self.step},
            "step": self.step,
            "epoch": self.loader.epoch,
            "loader": self.loader.state_dict(),
            "history": self.history,
            "epoch_sums": self.sums.state_dict(),
            "nan_skipped": self.nan_skipped,
            "extras": {k: v.state_dict() for k, v in self.extras.items()},
            "notes": json.dumps(self.notes),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        self.step, self.history = int(state["step"]), list(state["history"])
        self.sums = EpochSums.from_state(state["epoch_sums"])
        self.nan_skipped = int(state.get("nan_skipped", 0))
        for name, extra in self.extras.items():
            if name in state.get("extras", {}):
                extra.load_state_dict(state["extras"][name])
        self.notes = json.loads(state.get("notes", "{}"))
