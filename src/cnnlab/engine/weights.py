"""Final weights as `model.safetensors` plus a JSON sidecar that says how to rebuild and feed the model."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import save

from ..errors import CheckpointError
from ..models import create_model
from ..models.pretrained import load_pretrained, read_state_dict
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
    try:
        data = save(tensors, metadata={"format": "pt"})  # bytes in memory, then one atomic write
    except SafetensorError as exc:
        raise CheckpointError(f"cannot serialise the weights for {path}: {exc}") from None
    try:
        save_atomic(data, path)
        save_atomic(json.dumps(meta, indent=2).encode(), path.with_suffix(".json"))
    except OSError as exc:
        raise CheckpointError(f"cannot write {path} ({exc.strerror}); the checkpoints in {path.parent} are "
                              "intact: free some space and resume with --resume") from None


def resolve_weights(target: str | Path) -> Path:
    """A run folder or a weights file -> the .safetensors file."""
    target = Path(target)
    path = target / "model.safetensors" if target.is_dir() else target
    if not path.is_file():
        hint = " (the run may not have finished: resume it with 'cnnlab train --resume')" if target.is_dir() else ""
        raise CheckpointError(f"{path}: no weights file{hint}")
    return path


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _read_classes(path: str | Path | None, n: int) -> list[str]:
    if path is None:
        return [str(i) for i in range(n)]
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the class names ({exc.strerror})") from None
    if len(names) != n:
        raise CheckpointError(f"{path}: {len(names)} class names, but the model has {n} outputs")
    return names


def load_weights(target: str | Path, device: str | torch.device = "cpu", model_name: str | None = None,
                 classes_file: str | Path | None = None) -> LoadedModel:
    """A run folder, a cnnlab weights file with its sidecar, or a plain state dict (`.pth`, e.g. torchvision's)
    given with `model_name`: then preprocessing is ImageNet's (resize 256, centre crop 224, ImageNet mean/std)."""
    path = resolve_weights(target)
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        if model_name is None:
            raise CheckpointError(f"{path}: it has no sidecar {sidecar.name} saying which model it is; "
                                  "'cnnlab predict' takes --model NAME for such files (e.g. --model resnet50 for a "
                                  "torchvision checkpoint)")
        state = read_state_dict(path)
        head = state.get("fc.weight", state.get("classifier.6.weight"))
        num_classes = int(head.shape[0]) if head is not None else 1000
        model = create_model(model_name, num_classes=num_classes)
        load_pretrained(model, path, name=repr(model_name))
        meta = {"model": model_name, "model_args": {"num_classes": num_classes},
                "classes": _read_classes(classes_file, num_classes), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                "input_shape": [3, 224, 224], "resize": 256}
        return LoadedModel(model.to(device).eval(), meta, path)
    try:
        meta = json.loads(sidecar.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not an object")
        for key in ("model", "model_args", "classes", "mean", "std", "input_shape"):
            if key not in meta:
                raise ValueError(f"missing key {key!r}")
    except ValueError as exc:
        raise CheckpointError(f"{sidecar}: not a valid cnnlab weights sidecar ({exc})") from None
    if model_name is not None and model_name != meta["model"]:
        raise CheckpointError(f"{path}: its sidecar says it is {meta['model']!r}, not {model_name!r}; leave out --model")
    model = create_model(meta["model"], **meta["model_args"])
    load_pretrained(model, path, name=repr(meta["model"]))
    if classes_file is not None:
        meta["classes"] = _read_classes(classes_file, len(meta["classes"]))
    return LoadedModel(model.to(device).eval(), meta, path)


