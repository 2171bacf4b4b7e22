"""Final weights as `model.safetensors` plus a JSON sidecar that says how to rebuild and feed the model."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..models import create_model
from .checkpoint import save_atomic

__all__ = ["save_weights", "load_weights", "resolve_weights", "LoadedModel"]


class LoadedModel:
    """A model rebuilt from its weights file and sidecar, with what preprocessing needs."""

    def __init__(self, model: nn.Module, meta: dict, path: Path):
        self.model, self.meta, self.path = model, meta, path
        self.classes: list[str] = meta["classes"]
        self.mean, self.std = meta["mean"], meta["std"]
        self.input_shape: tuple[int, int, int] = tuple(meta["input_shape"])  # type: ignore[assignment]


def save_weights(model: nn.Module, path: Path, meta: dict) -> None:
    """Write weights and sidecar, each complete or absent."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    save_atomic(tmp.read_bytes(), path)
    tmp.unlink()
    save_atomic(json.dumps(meta, indent=2).encode(), path.with_suffix(".json"))


def resolve_weights(target: str | Path) -> Path:
    """A run folder or a weights file -> the .safetensors file."""
    target = Path(target)
    path = target / "model.safetensors" if target.is_dir() else target
    if not path.is_file():
        hint = " (the run may not have finished: resume it with 'cnnlab train --resume')" if target.is_dir() else ""
        raise CheckpointError(f"{path}: no weights file{hint}")
    return path


def load_weights(target: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    path = resolve_weights(target)
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not an object")
        for key in ("model", "model_args", "classes", "mean", "std", "input_shape"):
            if key not in meta:
                raise ValueError(f"missing key {key!r}")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: its sidecar {sidecar.name} is missing; it says which model the weights "
                              "belong to") from None
    except ValueError as exc:
        raise CheckpointError(f"{sidecar}: not a valid cnnlab weights sidecar ({exc})") from None
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    model = create_model(meta["model"], **meta["model_args"])
    missing, unexpected = _mismatch(model, state)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit model {meta['model']!r}: missing keys {missing or 'none'}, "
                              f"unexpected or mis-shaped keys {unexpected or 'none'}")
    model.load_state_dict(state)
    return LoadedModel(model.to(device).eval(), meta, path)


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in state if k not in own or own[k].shape != state[k].shape)
    return missing, unexpected
