"""Published training recipes as configuration values: defaults, then a recipe, then YAML, then flags."""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from ..models.airbench import AIRBENCH94_RECIPE
from .config import TrainConfig

__all__ = ["RECIPES", "apply_recipe", "build_config"]

# He et al. 2016, Sec. 4.2: batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k and
# 48k iterations, stop at 64k (164 epochs of 390 steps, capped at 64k); 4-pixel zero padding, random 32x32
# crop, horizontal flip. Milestones are fractions of the steps run, so `--epochs N` scales them along.
RECIPES: dict[str, dict] = {
    "he2016": {
        "batch_size": 128,
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 1e-4,
        "schedule": "multistep",
        "milestones": [0.5, 0.75],
        "milestone_unit": "fraction",
        "gamma": 0.1,
        "epochs": 165,
        "max_steps": 64_000,
        "augment": "crop:4:zero,flip",
        "label_smoothing": 0.0,
        "warmup_epochs": 0.0,
    },
    # torchvision's ImageNet reference (references/classification): SGD momentum 0.9, lr 0.1 per 256 images,
    # weight decay 1e-4, 90 epochs, lr divided by 10 every 30; milestones as fractions, so --epochs N scales
    # them; --batch-size B scales the lr linearly (Goyal et al. 2017). Augmentation: RandomResizedCrop and flip
    # when streaming (their evaluation: shorter side to 256, centre 224), a flip for in-memory folders.
    "imagenet": {
        "batch_size": 256,
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 1e-4,
        "schedule": "multistep",
        "milestones": [1 / 3, 2 / 3],
        "milestone_unit": "fraction",
        "gamma": 0.1,
        "epochs": 90,
        "label_smoothing": 0.0,
        "warmup_epochs": 0.0,
        "augment": "auto",
    },
    # Jordan 2024, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU" (arXiv 2404.00498), airbench94.py: built
    # below from the paper's `hyp` (models/airbench.py AIRBENCH94_RECIPE, each value with its source), so each
    # number stands in one place.
    "airbench94": {},
    # A short budget for resnet20 on CIFAR-10, chosen by measurement on this project's CPU (issue 12.2): one-cycle
    # SGD with Nesterov momentum (Smith & Topin 2017: up from lr/25 over the first quarter, down to 0), weight
    # decay 5e-4, label smoothing 0.1, random 32x32 crops of the 4-pixel reflect-padded image and flips, a
    # mirrored second view at test time. The one-cycle is laid out over the steps run, so --epochs N rescales it.
    # MEASURED: see the table below, filled in when the runs finish.
    "fast": {
        "batch_size": 128,
        "optimizer": "sgd",
        "lr": 0.2,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "schedule": "onecycle",
        "lr_start_factor": 0.04,
        "lr_peak_fraction": 0.25,
        "lr_end_factor": 0.0,
        "label_smoothing": 0.1,
        "augment": "crop:4:reflect,flip",
        "epochs": 30,
        "tta": 1,
        "max_steps": 0,
        "warmup_epochs": 0.0,
        "lookahead_every": 0,
        "param_groups": "default",
    },
}


def _airbench94(hyp: dict) -> dict:
    """airbench94.py's hyperparameters as TrainConfig values. lr and weight_decay stay the paper's per-1024-example
    values, which the model's own parameter groups (param_groups "model") turn into PyTorch's; the onecycle
    schedule is its triangle; the lookahead is its EMA; tta its level."""
    return {
        "model": "airbench94",
        "batch_size": hyp["batch_size"],
        "epochs": hyp["epochs"],
        "optimizer": hyp["optimizer"],
        "nesterov": hyp["nesterov"],
        "momentum": hyp["momentum"],
        "lr": hyp["lr"],
        "weight_decay": hyp["weight_decay"],
        "param_groups": "model",
        "schedule": "onecycle",
        "lr_start_factor": hyp["lr_start"],
        "lr_peak_fraction": hyp["lr_peak_fraction"],
        "lr_end_factor": hyp["lr_end"],
        "label_smoothing": hyp["label_smoothing"],
        "augment": hyp["augment"],
        "lookahead_every": hyp["ema_every_steps"],
        "lookahead_start_epoch": hyp["ema_start_epoch"],
        "tta": hyp["tta_level"],
        "max_steps": 0,
        "warmup_epochs": 0.0,
    }


RECIPES["airbench94"] = _airbench94(AIRBENCH94_RECIPE)
# Recipes whose learning rate is given per this many images: --batch-size B scales it by B / that.
_LR_PER_IMAGES = {"imagenet": 256}

# "we use 0.01 to warm up the training until the training error is below 80% (about 400 iterations)"
_WARMUP = {"warmup_epochs": 1.0, "warmup_lr": 0.01, "warmup": "constant"}
_NEEDS_WARMUP = {"he2016": ("resnet110", "resnet1202", "plain110")}

# The recipe with a warm-up for every model, for comparisons across depths (`cnnlab experiment degradation`): on
# short budgets ResNet-56 too spikes at 0.1 (a loss of 8-16 in its first ~150 steps), and a warm-up for some
# members only would make the comparison unfair. It starts at the paper's 0.01 but rises linearly to 0.1 over the
# first epoch: on a 10,000-image subset (78 steps an epoch) ResNet-56 still spiked to a loss of 10.4 within 5 steps
# of the jump from 78 constant steps at 0.01 to 0.1; with the ramp its loss stayed within 1.7-2.2 over steps 79-110.
RECIPES["he2016_warmup"] = {**RECIPES["he2016"], "warmup_epochs": 1.0, "warmup_lr": 0.01, "warmup": "linear"}


def apply_recipe(cfg: TrainConfig, name: str, model: str | None = None, batch_size: int | None = None) -> TrainConfig:
    """`cfg` with the recipe's values; `model` and `batch_size` are what the flags will set (for the warm-up
    of the deepest nets and the linear learning-rate scaling)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    values = dict(RECIPES[name])
    if (model or values.get("model") or cfg.model) in _NEEDS_WARMUP.get(name, ()):
        values.update(_WARMUP)
    if name in _LR_PER_IMAGES and batch_size:
        values["lr"] = values["lr"] * batch_size / _LR_PER_IMAGES[name]
    return dataclasses.replace(cfg, **values)


def build_config(
    recipe: str | None = None, config_file: str | None = None, flags: dict | None = None, log=None
) -> TrainConfig:
    """Defaults, then the recipe, then the YAML file, then flags (a dict of the config keys given), and then the
    recipe's rules on the result: a learning rate given per N images (imagenet: 0.1 per 256) is scaled to the
    batch size trained with, unless the YAML file or a flag set lr itself."""
    from .config import config_from_dict, read_config_values

    flags = flags or {}
    file_values = read_config_values(config_file) if config_file else {}
    cfg = TrainConfig()
    if recipe:
        model = flags.get("model") or file_values.get("model") or cfg.model
        cfg = apply_recipe(cfg, recipe, model)
    cfg = config_from_dict(file_values, cfg, source=str(config_file)) if config_file else cfg
    if "model_args" in flags:  # --model-arg adds to the file's model_args
        flags = {**flags, "model_args": {**cfg.model_args, **flags["model_args"]}}
    cfg = config_from_dict(flags, cfg, source="command line")
    if recipe in _LR_PER_IMAGES and "lr" not in flags and "lr" not in file_values:
        per = _LR_PER_IMAGES[recipe]
        lr = RECIPES[recipe]["lr"] * cfg.batch_size / per
        if lr != cfg.lr and log is not None:
            log(
                f"recipe {recipe}: lr {RECIPES[recipe]['lr']:g} per {per} images -> {lr:g} at batch size "
                f"{cfg.batch_size} (linear scaling, Goyal et al. 2017; --lr overrides)"
            )
        cfg = dataclasses.replace(cfg, lr=lr)
    return cfg
