"""Final weights as `model.safetensors` plus a JSON sidecar that says how to rebuild and feed the model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import save

from ..data.images import limits, raise_hint
from ..data.preprocess import Preprocess
from ..errors import CheckpointError, CnnlabError, ModelError
from ..files import save_atomic
from ..models import create_model
from ..models.convnet import CONVNET_SPEC, spec_values
from ..models.pretrained import load_pretrained, read_state_dict

__all__ = ["save_weights", "load_weights", "resolve_weights", "read_sidecar", "LoadedModel"]


class LoadedModel:
    """A model rebuilt from its weights file and sidecar, with its preprocessing (`preprocess`): the one every
    consumer (eval, predict, the report, export) applies."""

    def __init__(self, model: nn.Module, meta: dict, path: Path):
        self.model, self.meta, self.path = model, meta, path
        self.classes: list[str] = meta["classes"]
        self.preprocess = Preprocess.from_sidecar(meta)
        self.mean, self.std = list(self.preprocess.mean or ()), list(self.preprocess.std or ())
        self.input_shape: tuple[int, int, int] = self.preprocess.input_shape

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) -> the float input the model was trained on, on the images' device."""
        return self.preprocess.normalise(images)


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
        raise CheckpointError(
            f"cannot write {path} ({exc.strerror}); the checkpoints in {path.parent} are "
            "intact: free some space and resume with --resume"
        ) from None


def resolve_weights(target: str | Path) -> Path:
    """A run folder, a weights file, or the name of packaged weights ('resnet20-cifar10') -> the .safetensors
    file. An existing path wins over a packaged name; a packaged file is checked against its sha256 first."""
    from ..models.packaged import get_packaged, is_packaged, packaged_names

    target = Path(target)
    if not target.exists() and is_packaged(str(target)):
        return get_packaged(str(target)).verified_path()
    path = target / "model.safetensors" if target.is_dir() else target
    if not path.is_file():
        if target.is_dir():
            raise CheckpointError(
                f"{path}: no weights file (the run may not have finished: resume it with 'cnnlab train --resume')"
            )
        raise CheckpointError(
            f"{target}: no such run folder or weights file, and no packaged weights of that name; "
            f"packaged: {', '.join(packaged_names()) or 'none'} ('cnnlab models --pretrained')"
        )
    return path


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


_MAX_SIDECAR_BYTES = 16 << 20  # ImageNet-21k's class names take about 0.5 MB
_MAX_SIDE = 8192


def read_sidecar(sidecar: Path) -> dict:
    """Parse and check a weights sidecar (model.json); every flaw is a CheckpointError naming the file."""

    def invalid(reason: str) -> CheckpointError:
        return CheckpointError(
            f"{sidecar}: not a valid cnnlab weights sidecar ({reason}); it is written by "
            "'cnnlab train' next to model.safetensors"
        )

    try:
        if sidecar.stat().st_size > _MAX_SIDECAR_BYTES:
            raise invalid(f"{sidecar.stat().st_size:,} bytes, more than a sidecar ever needs")
        meta = json.loads(sidecar.read_bytes())
    except OSError as exc:
        raise CheckpointError(f"{sidecar}: cannot read ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise invalid(f"not JSON: {str(exc)[:120]}") from None

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(meta, dict):
        raise invalid("not a JSON object")
    for key in ("model", "model_args", "classes", "mean", "std", "input_shape"):
        if key not in meta:
            raise invalid(f"missing key {key!r}")
    shape = meta["input_shape"]
    checks = [
        (isinstance(meta["model"], str) and meta["model"], "'model' must be a model name"),
        (isinstance(meta["model_args"], dict), "'model_args' must be an object"),
        (
            isinstance(shape, list)
            and len(shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _MAX_SIDE for v in shape),
            f"'input_shape' must be [C, H, W] with each in 1..{_MAX_SIDE}",
        ),
        (
            isinstance(meta["classes"], list) and meta["classes"] and all(isinstance(c, str) for c in meta["classes"]),
            "'classes' must be a non-empty list of names",
        ),
    ]
    for ok, reason in checks:
        if not ok:
            raise invalid(reason)
    for key in ("mean", "std"):
        values = meta[key]
        if not (isinstance(values, list) and len(values) == shape[0] and all(number(v) for v in values)):
            raise invalid(f"{key!r} must be {shape[0]} numbers, one per input channel")
    if not all(v > 0 for v in meta["std"]):
        raise invalid("'std' must be positive")
    resize = meta.get("resize")
    if resize is not None and not (
        isinstance(resize, int) and not isinstance(resize, bool) and 1 <= resize <= _MAX_SIDE
    ):
        raise invalid(f"'resize' must be a side length in 1..{_MAX_SIDE}")
    try:  # the preprocessing a consumer will apply, recorded or (older sidecars) implied by input_shape and resize
        preprocess = Preprocess.from_sidecar(meta)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    if "preprocess" in meta:
        if list(preprocess.input_shape) != shape:
            raise invalid(f"'preprocess' gives input {list(preprocess.input_shape)}, 'input_shape' {shape}")
    return meta


def _build(name: str, model_args: dict, sidecar: Path) -> nn.Module:
    try:
        return create_model(name, **model_args)
    except CnnlabError as exc:
        raise CheckpointError(f"{sidecar}: {exc}") from None
    except (TypeError, ValueError, RuntimeError, OverflowError, KeyError, IndexError, ZeroDivisionError) as exc:
        raise CheckpointError(
            f"{sidecar}: cannot build {name!r} with model_args {model_args!r} ({type(exc).__name__}: {str(exc)[:120]})"
        ) from None


def _check_model_args(meta: dict, path: Path, sidecar: Path) -> None:
    """Bounded checks of what the sidecar asks to build, before anything is built (a spec of 10^8 layers once
    made predict run for ever): the layers a `cnn` spec or a `depth` asks for, and the values of a `cnn`'s state
    dict counted from its spec alone, against the weights file and the cap (data.images.Limits)."""
    lim = limits()
    args = meta["model_args"]
    depth = args.get("depth")
    if isinstance(depth, int) and depth > lim.model_layers:
        raise CheckpointError(
            f"{sidecar}: depth {depth:,} is more layers than cnnlab builds ({lim.model_layers:,}); "
            f"the sidecar is damaged, or {raise_hint('model_layers')}"
        )
    if meta["model"] != "cnn":
        return  # the other builders have a fixed number of layers: built on the meta device, they cost nothing
    spec = args.get("spec", CONVNET_SPEC)
    sizes = {k: args[k] for k in ("num_classes", "in_channels", "input_size") if k in args}
    if not isinstance(spec, str) or len(spec) > 10_000:
        raise CheckpointError(f"{sidecar}: 'spec' must be a model spec of at most 10,000 characters")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes.values() if not isinstance(v, list)):
        return  # a wrong type: _build names it
    try:
        values = spec_values(spec, **sizes)
    except ModelError as exc:
        raise CheckpointError(f"{sidecar}: {exc}") from None
    except (TypeError, ValueError):
        return  # malformed sizes: _build names them
    held = _numel_in_file(path)
    if values != held:
        raise CheckpointError(
            f"{path}: holds {held:,} weights but its sidecar {sidecar.name} describes a "
            f"{meta['model']!r} with {values:,}; the two files do not belong together"
        )
    if values > lim.model_parameters:
        raise CheckpointError(
            f"{sidecar}: its spec describes {values:,} weights, more than cnnlab loads "
            f"({lim.model_parameters:,}); the sidecar is damaged, or "
            f"{raise_hint('model_parameters')}"
        )


def _check_size_against_file(meta: dict, path: Path, sidecar: Path) -> None:
    """Build the described model without memory (on the meta device) and compare its size with what the
    weights file holds, so that a sidecar claiming, say, a billion classes allocates nothing."""
    with torch.device("meta"):
        shell = _build(meta["model"], meta["model_args"], sidecar)
    wanted = sum(t.numel() for t in shell.state_dict().values())
    held = _numel_in_file(path)
    if wanted != held:
        raise CheckpointError(
            f"{path}: holds {held:,} weights but its sidecar {sidecar.name} describes a "
            f"{meta['model']!r} with {wanted:,}; the two files do not belong together"
        )
    try:  # shapes only, on the meta device: does the model take input_shape, and give one output per class?
        with torch.device("meta"):
            out = shell.eval()(torch.empty(1, *meta["input_shape"]))
    except Exception as exc:  # any layer may object to a shape: all of them mean the same thing here
        raise CheckpointError(
            f"{sidecar}: the model does not take input_shape {meta['input_shape']} "
            f"({type(exc).__name__}: {str(exc)[:120]})"
        ) from None
    if tuple(out.shape) != (1, len(meta["classes"])):
        raise CheckpointError(
            f"{sidecar}: lists {len(meta['classes'])} classes but the model gives "
            f"{tuple(out.shape)[1:]} outputs; the sidecar does not belong to these weights"
        )


def _numel_in_file(path: Path) -> int:
    """Number of values in a safetensors file, from its header alone (which safe_open checks against the size)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def load_weights(
    target: str | Path,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
    classes_file: str | Path | None = None,
) -> LoadedModel:
    """A run folder, a cnnlab weights file with its sidecar, or a plain state dict (`.pth`, e.g. torchvision's)
    given with `model_name`: then preprocessing is ImageNet's (resize 256, centre crop 224, ImageNet mean/std)."""
    path = resolve_weights(target)
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        if model_name is None:
            raise CheckpointError(
                f"{path}: it has no sidecar {sidecar.name} saying which model it is; "
                "'cnnlab predict' takes --model NAME for such files (e.g. --model resnet50 for a "
                "torchvision checkpoint)"
            )
        state = read_state_dict(path)
        head = state.get("fc.weight", state.get("classifier.6.weight"))
        num_classes = int(head.shape[0]) if head is not None else 1000
        model = create_model(model_name, num_classes=num_classes)
        load_pretrained(model, path, name=repr(model_name))
        imagenet = Preprocess.imagenet_eval()
        assert imagenet.mean is not None and imagenet.std is not None  # ImageNet's statistics
        meta: dict[str, Any] = {
            "model": model_name,
            "model_args": {"num_classes": num_classes},
            "classes": _read_classes(classes_file, num_classes),
            "mean": list(imagenet.mean),
            "std": list(imagenet.std),
            "input_shape": list(imagenet.input_shape),
            "resize": imagenet.resize_to,
            "preprocess": imagenet.to_dict(),
        }
        return LoadedModel(model.to(device).eval(), meta, path)
    meta = read_sidecar(sidecar)
    if model_name is not None and model_name != meta["model"]:
        raise CheckpointError(
            f"{path}: its sidecar says it is {meta['model']!r}, not {model_name!r}; leave out --model"
        )
    _check_model_args(meta, path, sidecar)
    _check_size_against_file(meta, path, sidecar)
    model = _build(meta["model"], meta["model_args"], sidecar)
    load_pretrained(model, path, name=repr(meta["model"]))
    if classes_file is not None:
        meta["classes"] = _read_classes(classes_file, len(meta["classes"]))
    return LoadedModel(model.to(device).eval(), meta, path)
