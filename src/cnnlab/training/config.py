"""Typed training configuration: defaults, then a YAML file, then command-line flags.

An unknown key or a value of the wrong type fails here, before any work starts, and the message
lists the valid keys or choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, ModelError

__all__ = [
    "TrainConfig",
    "load_config",
    "read_config_values",
    "config_from_dict",
    "add_config_flags",
    "config_from_args",
    "flag_values",
    "yaml_dump",
]


def _opt(default, help: str, choices: tuple | None = None, **kw):
    return field(default=default, metadata={"help": help, "choices": choices}, **kw)


@dataclass
class TrainConfig:
    """Everything a training run needs; `cnnlab train --help` lists each field as a flag."""

    # what to train
    model: str = _opt("convnet", "registered model name (see 'cnnlab models')")
    model_args: dict = field(
        default_factory=dict,
        metadata={"help": "extra model keyword arguments, e.g. {spec: 'c16x2,p,f64'} (flag: --model-arg KEY=VALUE)"},
    )
    dataset: str = _opt("fashion-mnist", "dataset name (see 'cnnlab data list')")
    data_dir: str | None = _opt(None, "folder searched first for the dataset")
    # Recorded by fit, not a flag: data_dir made absolute, so the run's data is found from any working folder.
    data_dir_resolved: str | None = field(default=None, metadata={"help": "", "flag": False})
    download: bool = _opt(False, "download the dataset into the cache if it is not found")
    val_split: float = _opt(0.0, "fraction of the training split held out for validation (fixed seed)")
    train_subset: int = _opt(0, "use only the first N training images (0: all); for quick experiments")
    augment: str = _opt("auto", "batched augmentations, e.g. 'crop:4:reflect,flip'; 'auto' picks per dataset")
    data_mode: str = _opt(
        "auto",
        "image folders: 'memory' decodes every image once into RAM, 'stream' decodes "
        "per sample in loader workers; 'auto' streams when the images differ in size or exceed "
        "--memory-budget (shards always stream)",
        ("auto", "memory", "stream"),
    )
    memory_budget: str = _opt("2GiB", "data_mode auto: largest decoded image folder kept in RAM (e.g. 512MB, 8GiB)")
    workers: int = _opt(2, "streaming: DataLoader worker processes that decode images (0: in the main process)")
    max_bad_images: int = _opt(-1, "streaming: unreadable images skipped before the run stops (-1: 0.1% of the split)")
    shuffle_buffer: int = _opt(1000, "shards: samples held in each stream's shuffle buffer")
    image_size: int = _opt(
        0,
        "side length the model sees: images are resized to it batch by batch (e.g. 64 to "
        "feed CIFAR to alexnet); 0 keeps the data's size",
    )
    init_from: str | None = _opt(
        None, "start from the weights of this run folder or weights file (same model; a fresh schedule and optimiser)"
    )
    # optimisation
    epochs: float = _opt(6, "passes over the training data (fractional allowed: 9.9 stops inside the 10th)")
    batch_size: int = _opt(128, "images per step")
    optimizer: str = _opt("sgd", "optimiser", ("sgd", "adamw"))
    lr: float = _opt(
        0.05,
        "peak learning rate; 'find' runs the learning-rate finder first (cnnlab lr-find) and "
        "trains with its suggestion",
    )
    lr_find: bool = _opt(
        False,
        "run the learning-rate finder before training and train with its suggestion "
        "(what --lr find sets; the finder's figures go to summary.json and lr_find.png)",
    )
    momentum: float = _opt(0.9, "SGD momentum (AdamW: beta1)")
    nesterov: bool = _opt(True, "Nesterov momentum for SGD")
    weight_decay: float = _opt(
        5e-4, "weight decay (L2 for SGD, decoupled for AdamW); never applied to biases or normalisation parameters"
    )
    schedule: str = _opt("onecycle", "learning-rate schedule", ("onecycle", "cosine", "multistep", "constant"))
    lr_start_factor: float = _opt(0.04, "onecycle: the learning rate starts at lr times this")
    lr_peak_fraction: float = _opt(0.25, "onecycle: fraction of the steps at which it peaks at lr")
    lr_end_factor: float = _opt(0.0, "onecycle: the learning rate ends at lr times this")
    param_groups: str = _opt(
        "default",
        "'default': weight decay on weight matrices and kernels only; 'model': the "
        "model's own groups (airbench94: the paper's 64x lr on batch-norm shifts)",
        ("default", "model"),
    )
    lookahead_every: int = _opt(
        0,
        "every N steps, pull the weights towards a slow copy and back (airbench94's "
        "lookahead; decay 0.95^N * (step/total)^3); 0: off",
    )
    lookahead_start_epoch: float = _opt(0.0, "epoch from which the lookahead runs")
    warmup_epochs: float = _opt(0.0, "linear warm-up length for 'cosine', 'multistep' and 'constant'")
    warmup_lr: float = _opt(0.0, "learning rate at the start of warm-up (0: start from 0)")
    warmup: str = _opt(
        "linear", "warm-up shape: 'linear' from warmup_lr to lr, or 'constant' at warmup_lr", ("linear", "constant")
    )
    milestones: list = field(
        default_factory=list,
        metadata={"help": "multistep: where the learning rate is divided, in milestone_unit (e.g. 30,60)"},
    )
    milestone_unit: str = _opt(
        "epoch", "unit of milestones ('fraction': of the run's total steps)", ("epoch", "iteration", "fraction")
    )
    gamma: float = _opt(0.1, "multistep: factor at each milestone")
    max_steps: int = _opt(0, "stop after this many optimiser steps (0: run all epochs); schedules span the steps run")
    label_smoothing: float = _opt(0.1, "cross-entropy label smoothing")
    grad_clip: float = _opt(0.0, "clip the gradients' global L2 norm to this value (0: off)")
    # how to run
    precision: str = _opt(
        "auto",
        "'auto' takes bf16 on CUDA GPUs that have it, and on CPUs where a probe "
        "measures bf16 autocast clearly faster than fp32; else fp32",
        ("auto", "fp32", "bf16"),
    )
    channels_last: str = _opt(
        "auto",
        "memory format; 'auto' takes channels_last where a probe measures it faster (always on CUDA)",
        ("auto", "on", "off"),
    )
    compile: bool = _opt(False, "torch.compile the model (slower start, sometimes faster steps)")
    device: str = _opt("auto", "'auto' takes CUDA when present, e.g. cpu, cuda, cuda:1")
    seed: int = _opt(0, "seed for initialisation, data order and augmentation")
    deterministic: bool = _opt(False, "deterministic algorithms only, no autotuning")
    threads: int = _opt(0, "CPU threads for PyTorch (0: PyTorch's default; under torchrun: cores / local ranks)")
    sync_bn: bool = _opt(
        False, "distributed runs on GPUs: synchronise batch-norm statistics across ranks (SyncBatchNorm)"
    )
    # outputs
    run_dir: str | None = _opt(None, "run folder (default runs/<model>-<dataset>-<time>)")
    runs_root: str = _opt("runs", "parent folder of the default run folders")
    eval_every: int = _opt(1, "evaluate on the test split every N epochs (0: only at the end)")
    eval_every_steps: int = _opt(0, "also evaluate every N steps, mid-epoch, into evals.csv (times to accuracy)")
    tta: int = _opt(
        0,
        "test-time augmentation of the final evaluation: 0 none, 1 mirror, 2 mirror and 1-pixel shifts (airbench94)",
        (0, 1, 2),
    )
    logger: str = _opt("csv", "where metrics go: csv (metrics.csv, always), tensorboard, mlflow; comma-separated")
    checkpoint_every: int = _opt(0, "also checkpoint every N steps (0: at the end of each epoch only)")
    progress: str = _opt(
        "auto", "progress display: a bar on a terminal, plain lines elsewhere", ("auto", "bar", "plain", "none")
    )
    log_every: int = _opt(100, "plain progress: one line every N steps")
    report: bool = _opt(
        True, "write report.html into the run folder at the end ('cnnlab report'); --no-report skips it"
    )
    on_nan: str = _opt(
        "stop",
        "what a NaN or infinite loss or gradient does: 'stop' the run (the last good "
        "checkpoint stays), or 'skip' that step's update, up to max_nan_skips times",
        ("stop", "skip"),
    )
    max_nan_skips: int = _opt(10, "with on_nan 'skip': the run stops at the next non-finite step after this many")

    def schedule_options(self) -> dict:
        """build_schedule's keywords beyond the name, lr and lengths."""
        return dict(
            warmup_epochs=self.warmup_epochs,
            warmup_lr=self.warmup_lr,
            warmup=self.warmup,
            milestones=self.milestones,
            milestone_unit=self.milestone_unit,
            gamma=self.gamma,
            lr_start_factor=self.lr_start_factor,
            lr_peak_fraction=self.lr_peak_fraction,
            lr_end_factor=self.lr_end_factor,
        )

    def optimizer_options(self) -> dict:
        """optim.build_training_optimizer's keywords."""
        return dict(
            name=self.optimizer,
            lr=self.lr,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
            param_groups=self.param_groups,
            batch_size=self.batch_size,
            model_name=self.model,
        )

    def model_kwargs(self, shape: tuple[int, int, int], num_classes: int) -> dict:
        """The model's constructor keywords for data of `shape` (C, H, W) and `num_classes`; model_args win."""
        from ..models.registry import accepts

        kwargs = {"num_classes": num_classes, "in_channels": shape[0], **self.model_args}
        if accepts(self.model, "input_size"):  # nets with a flatten layer; pooled nets take any size
            kwargs = {"input_size": list(shape[1:]), **kwargs}
        return kwargs

    def validate(self) -> TrainConfig:
        from ..data.augment import parse_augment
        from ..data.catalog import get_spec
        from ..errors import DatasetError
        from ..models.registry import model_entrypoint

        try:
            model_entrypoint(self.model)  # unknown model: lists the valid ones
            get_spec(self.dataset)  # unknown dataset: the nearest names, then the valid ones
        except (ModelError, DatasetError) as exc:
            raise ConfigError(str(exc)) from None
        checks = [
            (self.epochs > 0, "epochs", self.epochs, "more than 0"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "at least 1"),
            (self.lr > 0, "lr", self.lr, "a positive number, e.g. 0.003"),
            (self.weight_decay >= 0, "weight_decay", self.weight_decay, "0 or more"),
            (0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)"),
            (0 <= self.val_split < 1, "val_split", self.val_split, "in [0, 1)"),
            (0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip", self.grad_clip, "0 (off) or more"),
            (self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "0 or more"),
            (self.train_subset >= 0, "train_subset", self.train_subset, "0 (all) or more"),
            (self.max_steps >= 0, "max_steps", self.max_steps, "0 (no limit) or more"),
            (self.log_every >= 1, "log_every", self.log_every, "at least 1"),
            (self.eval_every >= 0, "eval_every", self.eval_every, "0 (only at the end) or more"),
            (self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "0 (epoch ends) or more"),
            (self.threads >= 0, "threads", self.threads, "0 (default) or more"),
            (self.max_nan_skips >= 0, "max_nan_skips", self.max_nan_skips, "0 or more"),
            (self.image_size >= 0, "image_size", self.image_size, "0 (the data's size) or a side length"),
            (self.workers >= 0, "workers", self.workers, "0 or more"),
            (self.max_bad_images >= -1, "max_bad_images", self.max_bad_images, "-1 (0.1% of the split) or more"),
            (self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer, "at least 1"),
            (0 <= self.lr_start_factor <= 1, "lr_start_factor", self.lr_start_factor, "in [0, 1]"),
            (0 < self.lr_peak_fraction < 1, "lr_peak_fraction", self.lr_peak_fraction, "in (0, 1)"),
            (0 <= self.lr_end_factor <= 1, "lr_end_factor", self.lr_end_factor, "in [0, 1]"),
            (self.lookahead_every >= 0, "lookahead_every", self.lookahead_every, "0 (off) or more"),
            (self.eval_every_steps >= 0, "eval_every_steps", self.eval_every_steps, "0 (off) or more"),
        ]
        for ok, name, value, want in checks:
            if not ok:
                raise ConfigError(f"{name} = {value!r} is invalid: it must be {want}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{f.name} = {getattr(self, f.name)!r} is invalid; choices: {', '.join(map(str, choices))}"
                )
        if self.schedule == "multistep" and not self.milestones:
            raise ConfigError("schedule 'multistep' needs milestones, e.g. --milestones 30,60")
        if self.device not in ("auto", "cpu") and not self.device.startswith(("cuda", "mps")):
            raise ConfigError(f"device = {self.device!r} is invalid; use auto, cpu, cuda or cuda:N")
        parse_augment("" if self.augment == "auto" else self.augment)
        from ..data.stream import parse_bytes
        from .loggers import check_loggers

        check_loggers(self.logger)
        try:
            parse_bytes(self.memory_budget)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(
                f"memory_budget = {self.memory_budget!r} is invalid ({exc}); e.g. 512MB or 8GiB"
            ) from None
        return self


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Check a YAML or flag value against the field's declared type; ints are accepted for floats."""
    hint = typing.get_type_hints(TrainConfig)[name]
    allowed = typing.get_args(hint) or (hint,)
    choices = _FIELDS[name].metadata.get("choices") or ()
    if isinstance(value, bool) and "on" in choices:  # YAML 1.1 reads a bare on/off as a boolean
        value = "on" if value else "off"
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads '3e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is bool and isinstance(value, bool):
            return value
        if t in (int, str, dict, list) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{name}: expected {names}, got {type(value).__name__} {value!r}")


def config_from_dict(values: dict, base: TrainConfig | None = None, source: str = "config") -> TrainConfig:
    not_names = [k for k in values if not isinstance(k, str)]
    if not_names:
        raise ConfigError(
            f"{source}: keys must be names, not {', '.join(repr(k) for k in not_names[:5])}; "
            f"valid keys: {', '.join(_FIELDS)}"
        )
    unknown = [k for k in values if k not in _FIELDS]
    if unknown:
        hints = [
            f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, _FIELDS, 1)) else repr(k)
            for k in unknown
        ]
        raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)}; valid keys: {', '.join(_FIELDS)}")
    if values.get("lr") == "find":  # `--lr find`, `lr: find`: the finder decides; lr stays the base value
        values = {**{k: v for k, v in values.items() if k != "lr"}, "lr_find": True}
    elif "lr" in values and "lr_find" not in values:  # a number given over a base that said 'find'
        values = {**values, "lr_find": False}
    cfg = dataclasses.replace(base or TrainConfig(), **{k: _coerce(k, v) for k, v in values.items()})
    return cfg


_MAX_CONFIG_BYTES = 1 << 20


class _PlainLoader(yaml.SafeLoader):
    """safe_load without aliases: a config never needs them, and nested aliases can expand a few
    hundred bytes into gigabytes (the "billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a cnnlab config", event.start_mark
            )
        return super().compose_node(parent, index)


def load_config(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """A YAML file's keys over `base` (default: TrainConfig's defaults), checked."""
    return config_from_dict(read_config_values(path), base, source=str(path))


def read_config_values(path: str | Path) -> dict:
    """The keys a YAML config file sets, parsed safely (no aliases, bounded size) but not yet checked."""
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: {path.stat().st_size:,} bytes is far more than a config file holds; is this the right file?"
            )
        text = path.read_bytes().decode("utf-8")
        values = yaml.load(text, Loader=_PlainLoader) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config file") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
    return values


def yaml_dump(cfg: TrainConfig) -> bytes:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False).encode()


def _flag_value(text: str) -> Any:
    """Parse a flag's text as YAML, so '3e-3' is a float, 'true' a bool and '[1, 2]' a list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; a flag left unset does not override the YAML file or the defaults."""
    group = parser.add_argument_group("training configuration (defaults, then --config FILE, then these flags)")
    for f in fields(TrainConfig):
        if f.metadata.get("flag") is False:
            continue
        if f.name == "model_args":
            group.add_argument(
                "--model-arg", dest="model_args", action="append", metavar="KEY=VALUE", help=f.metadata["help"]
            )
            continue
        # every field has a default or a default_factory
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        choices = f.metadata.get("choices")
        help_text = f"{f.metadata['help']} (default: {default})"
        if choices:
            help_text += f"; choices: {', '.join(map(str, choices))}"
        is_bool = typing.get_type_hints(TrainConfig)[f.name] is bool
        bool_args: dict[str, Any] = {"nargs": "?", "const": "true"} if is_bool else {}
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=help_text.replace("%", "%%"),
            **bool_args,
        )


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    return config_from_dict(flag_values(args, base), base, source="command line")


def flag_values(args: argparse.Namespace, base: TrainConfig | None = None) -> dict[str, Any]:
    """The config keys set by flags, parsed (a --model-arg adds to `base`'s model_args)."""
    values: dict[str, Any] = {}
    for f in fields(TrainConfig):
        raw = getattr(args, f.name, None)
        if raw is None:
            continue
        if f.name == "model_args":
            pairs = {}
            for item in raw:
                key, sep, text = item.partition("=")
                if not sep or not key:
                    raise ConfigError(f"--model-arg {item!r}: expected KEY=VALUE, e.g. --model-arg spec=c16x2,p,f64")
                pairs[key] = _flag_value(text)
            values["model_args"] = {**(base.model_args if base else {}), **pairs}
        elif f.name == "milestones":
            values[f.name] = [_flag_value(t) for t in str(raw).split(",") if t.strip()]
        else:
            hint = typing.get_type_hints(TrainConfig)[f.name]
            values[f.name] = raw if hint in (str, str | None) else _flag_value(raw)
    return values
