"""Model registry: the key is the builder function's name, as in timm."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch.nn as nn

from ..errors import ModelError

__all__ = ["register_model", "create_model", "list_models", "model_entrypoint", "accepts"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names in natural order: resnet18 before resnet101, plain20 before plain110."""
    return sorted(_MODELS, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    try:
        return _MODELS[name]
    except (KeyError, TypeError):
        import difflib

        close = difflib.get_close_matches(str(name), list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ModelError(f"unknown model {name!r}{hint}; valid models: {', '.join(list_models())}") from None


def create_model(name: str, weights: str | Path | None = None, **kwargs) -> nn.Module:
    """Build a registered model, e.g. ``create_model("convnet", in_channels=1, input_size=28)``.

    `weights`: a state-dict file (`.pth` as torchvision saves them, or `.safetensors`) loaded with strict checks,
    or the dataset of packaged weights (``create_model("resnet20", weights="cifar10")``, as torchvision and timm
    name theirs): those bring their own model arguments, and the model gets a `pretrained_cfg` dict with the
    classes and the input normalisation they expect.
    """
    builder = model_entrypoint(name)
    packaged, meta = None, {}
    if weights is not None and not Path(weights).is_file():  # a folder called 'cifar10' does not shadow the name
        from .packaged import find_packaged

        packaged = find_packaged(name, str(weights))
        weights = packaged.verified_path()  # hashed against the registry before anything is read from it
        meta = json.loads(packaged.sidecar_path.read_text())
        kwargs = _packaged_args(packaged.name, meta["model_args"], kwargs)
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not takes_any:
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ModelError(
                f"model {name!r} takes no argument(s) {', '.join(unknown)}; valid: {', '.join(params) or 'none'}"
            )
    try:
        model = builder(**kwargs)
    except ModelError:
        raise
    except (
        TypeError,
        ValueError,
        AttributeError,
        KeyError,
        IndexError,
        OverflowError,
        ZeroDivisionError,
        RuntimeError,
    ) as exc:  # an argument of the wrong type or range, e.g. num_classes=-1 or spec=None
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())[:300]
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"model {name!r} cannot be built with {shown}: {reason}") from None
    if weights is not None:
        from .pretrained import load_pretrained

        load_pretrained(model, weights, name=repr(name))
    if packaged is not None:
        cfg = {
            "name": packaged.name,
            "dataset": packaged.dataset,
            "test_accuracy": packaged.test_accuracy,
            "classes": meta["classes"],
            "mean": meta["mean"],
            "std": meta["std"],
            "input_shape": meta["input_shape"],
        }
        model.pretrained_cfg = cfg  # type: ignore[assignment]  # timm's name; Module.__setattr__ is typed for tensors
    return model


def _packaged_args(packaged: str, own: dict, kwargs: dict) -> dict:
    """The packaged model's own arguments (e.g. in_channels=1 for Fashion-MNIST), which `kwargs` may not contradict."""

    def plain(value):  # tuples as lists, as the sidecar holds them
        try:
            return json.loads(json.dumps(value))
        except (TypeError, ValueError):
            return value

    clash = [f"{k}={kwargs[k]!r} (they have {own[k]!r})" for k in kwargs if k in own and plain(kwargs[k]) != own[k]]
    if clash:
        raise ModelError(
            f"packaged weights {packaged!r} do not fit {', '.join(clash)}; leave those out, or "
            "build the model without weights and load the layers you want"
        )
    return {**own, **kwargs}


def accepts(name: str, keyword: str) -> bool:
    """Whether model `name`'s builder or the class it builds names `keyword` as a parameter."""
    builder = model_entrypoint(name)
    if keyword in inspect.signature(builder).parameters:
        return True
    returns = inspect.signature(builder).return_annotation
    cls = getattr(inspect.getmodule(builder), returns, None) if isinstance(returns, str) else returns
    return inspect.isclass(cls) and keyword in inspect.signature(cls.__init__).parameters
