"""Loading weights files into a model: torchvision-style `.pth` state dicts or `.safetensors`.

`.pth` files are read with `torch.load(weights_only=True)`: a pickle that would build anything but
tensors and plain containers is refused, never executed.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError

__all__ = ["read_state_dict", "load_pretrained", "state_dict_mismatch"]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: it holds more than tensors and plain containers, and loading it "
            f"could run code ({str(exc).splitlines()[0]})"
        ) from None
    except Exception as exc:  # a malformed file raises many types (struct.error, RuntimeError, EOFError, ...)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({reason})") from None
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers around a state dict
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise CheckpointError(
            f"{path}: not a state dict (a mapping of parameter names to tensors); "
            "save one with torch.save(model.state_dict(), path)"
        )
    return state


def state_dict_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, keys whose shapes differ as 'key: file shape vs model shape')."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    return missing, unexpected, shapes


def load_pretrained(model: nn.Module, path: str | Path, name: str = "the model") -> nn.Module:
    """Load `path` into `model` with strict key and shape checking; the error names what does not fit."""
    state = read_state_dict(path)
    missing, unexpected, shapes = state_dict_mismatch(model, state)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
        if shapes:
            parts.append(f"shape mismatches: {'; '.join(shapes[:4])}")
        hint = ""
        head = [k for k in ("fc.weight", "classifier.6.weight") if k in state and k in dict(model.state_dict())]
        only_the_head = all(s.split(":")[0].split(".")[0] == head[0].split(".")[0] for s in shapes) if head else False
        if head and shapes and not missing and not unexpected and only_the_head:
            n = state[head[0]].shape[0]
            hint = (
                f"; the file's classifier has {n} classes: build the model with num_classes={n} (on the command "
                f"line --model-arg num_classes={n}, or --num-classes {n} for 'cnnlab summary'), or load it that "
                "way and replace the head for your classes"
            )
        raise CheckpointError(f"{path}: weights do not fit {name}: " + "; ".join(parts) + hint)
    model.load_state_dict(state, strict=True)
    return model
