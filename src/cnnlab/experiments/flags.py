"""From the experiment's command-line values to each member's `cnnlab train` flags, checked before any work starts."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path

from ..errors import ConfigError
from ..training.config import TrainConfig, config_from_args
from ..training.recipes import RECIPES, apply_recipe
from .runner import EXECUTION_FLAGS

__all__ = ["recipe_args", "member_train_args", "check_devices", "default_threads"]

_FIELDS = {f.name: f for f in fields(TrainConfig)}
_PATHS = ("data_dir",)  # made absolute, so that a printed command runs from any folder
# `cnnlab train --recipe` knows the published recipes; a variant is given as its base plus the flags that differ.
_BASE_RECIPE = {"he2016_warmup": "he2016"}


def recipe_args(name: str | None, skip=()) -> list[str]:
    """A recipe as `cnnlab train` flags: `--recipe he2016`, plus the values in which a variant differs from it
    (he2016_warmup: the warm-up flags) unless the command sets them (`skip`)."""
    if not name or name == "none":
        return []
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}, none")
    base = _BASE_RECIPE.get(name, name)
    extra = {k: v for k, v in RECIPES[name].items() if RECIPES[base].get(k) != v and k not in skip}
    return ["--recipe", base, *(a for k, v in extra.items() for a in (f"--{k.replace('_', '-')}", str(v)))]


def _as_flags(values: dict) -> list[str]:
    out: list[str] = []
    for name in _FIELDS:  # in TrainConfig's order, so that equal requests give equal commands
        raw = values.get(name)
        if raw is None:
            continue
        if name == "model_args":
            out += [a for item in raw for a in ("--model-arg", item)]
        elif name == "report" and str(raw).lower() == "false":
            out.append("--no-report")
        else:
            out += [f"--{name.replace('_', '-')}", str(raw)]
    return out


def member_train_args(
    values: dict, recipe: str | None, refused: dict[str, str], models: tuple[str, ...] = ()
) -> tuple[list[str], list[str], list[str]]:
    """(flags every member gets, those of them given on the command line, flags that only say how to run):
    `values` holds the train flags given on the command line (raw text, as argparse left them). A flag in
    `refused` gets its message; bad values fail here."""
    values = {k: v for k, v in values.items() if v is not None}
    for key, why in refused.items():
        if key in values:
            raise ConfigError(f"--{key.replace('_', '-')}: {why}")
    for key in _PATHS:
        if key in values:
            values[key] = str(Path(values[key]).expanduser().resolve())
    # Check every value as `cnnlab train` would, with the recipe under the flags, for each model trained.
    namespace = argparse.Namespace(**{name: values.get(name) for name in _FIELDS})
    for model in models or (values.get("model") or TrainConfig().model,):
        base = TrainConfig(model=model)
        if recipe and recipe != "none":
            base = apply_recipe(base, recipe, model)
        config_from_args(namespace, base).validate()
    spec_values = {k: v for k, v in values.items() if k not in EXECUTION_FLAGS}
    execution = {k: v for k, v in values.items() if k in EXECUTION_FLAGS}
    given = _as_flags(spec_values)
    return recipe_args(recipe, skip=values) + given, given, _as_flags(execution)


def check_devices(text: str | None) -> list[str]:
    if not text:
        return []
    devices = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in devices if d != "cpu" and not d.startswith(("cuda", "mps"))]
    if bad or not devices:
        raise ConfigError(f"--devices {text!r}: expected a list such as cuda:0,cuda:1 (or cpu)")
    return devices


def default_threads(jobs: int) -> int:
    """CPU threads per member when `jobs` members share this machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(jobs, 1))
