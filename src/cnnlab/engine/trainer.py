"""`fit(config)`: the whole training run, from dataset to weights, on one process or many (torchrun), resumable
bit for bit on CPU. Read top to bottom: setup, resume, the epoch loop, the finish."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import __version__
from ..data import InMemoryLoader, channel_stats, get_spec, load_dataset, parse_augment, split_validation
from ..errors import CheckpointError, CnnlabError, ConfigError
from ..models import accepts, create_model
from ..models.summary import check_input_size
from .config import TrainConfig, config_from_dict, load_config
from .evaluate import evaluate
from .loggers import LoggerGroup, build_loggers
from .lookahead import Lookahead
from .loop import NonFiniteStep, RunState, SignalStop, StepRules, train_one_epoch
from .optim import build_optimizer, build_schedule
from .progress import Progress, trace
from .run_folder import RunFolder
from .runtime import Runtime, start_runtime
from .state import TrainState
from .weights import load_weights, save_weights

__all__ = ["fit", "resume_config", "TrainingError", "TrainingInterrupted", "DEFAULT_AUGMENT", "RunState",
           "TrainingData", "load_training_data", "build_model", "cross_entropy"]

# What `augment: auto` means: shifts and flips suit natural images and clothing; digits would change meaning.
DEFAULT_AUGMENT = {"cifar10": "crop:4:reflect,flip", "cifar100": "crop:4:reflect,flip", "fashion-mnist": "none",
                   "mnist": "none", "imagefolder": "flip"}

# Keys that fix the architecture and data: a resumed run may not change them.
_FROZEN_ON_RESUME = ("model", "model_args", "dataset", "batch_size", "seed", "train_subset", "val_split", "augment",
                     "image_size", "init_from")


class TrainingError(CnnlabError):
    """Training cannot go on (a NaN loss, say); the last good checkpoint is kept."""


class TrainingInterrupted(CnnlabError):
    """Stopped by SIGINT/SIGTERM or a callback at a step boundary, after writing a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def resume_config(run_dir: str | Path, overrides: TrainConfig | None = None, changed: Sequence[str] = ()) -> TrainConfig:
    """The run's own config, with the flags in `changed` taken from `overrides`; architecture changes refused."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir}: not a run folder (no config.yaml); give the folder 'cnnlab train' made")
    cfg = load_config(run_dir / "config.yaml")
    for key in changed:
        new = getattr(overrides, key)
        if key in _FROZEN_ON_RESUME and new != getattr(cfg, key):
            raise CheckpointError(f"cannot resume {run_dir} with {key} = {new!r}: the run was made with "
                                  f"{getattr(cfg, key)!r}. Start a new run instead (without --resume)")
        cfg = dataclasses.replace(cfg, **{key: new})
    return dataclasses.replace(cfg, run_dir=str(run_dir))


def cross_entropy(label_smoothing: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The default loss: mean cross-entropy of float32 logits, with label smoothing."""
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    return loss


# ---------------------------------------------------------------------------------------------- setup pieces

@dataclass
class TrainingData:
    """The loaders of a run and what the model and the run folder need to know about its data."""
    train: InMemoryLoader
    test: InMemoryLoader
    val: InMemoryLoader | None
    classes: list[str]
    shape: tuple[int, int, int]  # what the model sees: C, H, W (after --image-size)
    mean: list[float]
    std: list[float]
    augment: str
    fingerprint: str
    dataset: object  # cnnlab.data.Dataset (or a streamed one): name, source, verified, files, test labels
    mode: str = "memory"  # or "stream"
    mode_reason: str = ""
    train_images: torch.Tensor | None = None  # uint8, in memory mode (for models that prepare from data)

    def describe(self) -> str:
        return self.dataset.describe()

    def bad_images(self) -> list[dict]:
        return getattr(self.train, "bad_images", []) + getattr(self.test, "bad_images", [])


@dataclass
class StreamedDataset:
    """What a run records of data it streams: never all in memory, so described by its file lists."""
    name: str
    source: str
    classes: list[str]
    counts: dict
    image_size: int
    files: list[dict]
    test_labels: torch.Tensor | None
    verified: None = None  # the user's own files: no publisher checksum

    def describe(self) -> str:
        return (f"{self.name}: {self.counts['train']:,} train / {self.counts['test']:,} test images from "
                f"{self.source}, streamed at {self.image_size}x{self.image_size} [your own files: no publisher "
                "checksum to verify against]")


def _fingerprint(data, train_labels: torch.Tensor, val_labels: torch.Tensor | None) -> str:
    """Identifies the exact training data: the source files' sha256 (or, for an image folder, the decoded
    pixels) and the labels after subsetting and the validation split."""
    h = hashlib.sha256(json.dumps([f["sha256"] for f in data.files]).encode())  # not the paths: copies may move
    if data.name == "imagefolder":
        h.update(data.train_images.numpy().tobytes())
    h.update(train_labels.numpy().tobytes())
    if val_labels is not None:
        h.update(val_labels.numpy().tobytes())
    return h.hexdigest()


def choose_mode(cfg: TrainConfig) -> tuple[str, str]:
    """("memory" | "stream", the reason to print) for the run's data."""
    if cfg.dataset == "shards":
        return "stream", "data mode stream: shards are always streamed"
    if cfg.dataset != "imagefolder":
        return "memory", f"data mode memory: {cfg.dataset} is decoded once into RAM"
    from ..data.stream import choose_data_mode, parse_bytes
    if cfg.data_dir is None:
        raise ConfigError(f"imagefolder needs --data-dir ROOT; {get_spec('imagefolder').how_to_get}")
    return choose_data_mode(cfg.data_dir, cfg.data_mode, cfg.image_size or None, parse_bytes(cfg.memory_budget))


def load_training_data(cfg: TrainConfig, runtime: Runtime, log: Callable[[str], None] = print) -> TrainingData:
    """Find and decode the dataset (or list it, to stream it), split it, compute the normalisation, and
    build this rank's loaders."""
    mode, reason = choose_mode(cfg)
    if mode == "stream":
        return _streamed_data(cfg, runtime, reason)
    if cfg.download and runtime.distributed:  # one download, by rank 0, before the others look
        if runtime.is_main:
            load_dataset(cfg.dataset, cfg.data_dir, download=True, log=log)
        runtime.barrier()
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, log=log, write_cache=runtime.is_main,
                        image_size=cfg.image_size or None)
    train_x, train_y = data.train_images, data.train_labels
    if cfg.train_subset:
        train_x, train_y = train_x[:cfg.train_subset], train_y[:cfg.train_subset]
    val_x = val_y = None
    if cfg.val_split:
        train_x, train_y, val_x, val_y = split_validation(train_x, train_y, cfg.val_split, seed=cfg.seed)
    mean, std = channel_stats(train_x)
    augment = DEFAULT_AUGMENT.get(cfg.dataset, "none") if cfg.augment == "auto" else cfg.augment
    c, h, w = data.shape
    resize = (cfg.image_size, cfg.image_size) if cfg.image_size and (cfg.image_size, cfg.image_size) != (h, w) \
        else None
    common = dict(mean=mean, std=std, device=runtime.device, channels_last=runtime.channels_last, rank=runtime.rank,
                  world_size=runtime.world_size, resize=resize)
    train = InMemoryLoader(train_x, train_y, cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed + 1,
                           augment=parse_augment(augment), **common)
    if len(train) == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(train_y)} training images; "
                          "lower --batch-size")
    eval_batch = max(cfg.batch_size // runtime.world_size, 1024)
    test = InMemoryLoader(data.test_images, data.test_labels, eval_batch, **common)
    val = None if val_x is None else InMemoryLoader(val_x, val_y, eval_batch, **common)
    shape = (c, *(resize or (h, w)))
    return TrainingData(train, test, val, list(data.classes), shape, mean, std, augment,
                        _fingerprint(data, train_y, val_y), data, mode, reason, train_x)


def _streamed_data(cfg: TrainConfig, runtime: Runtime, reason: str) -> TrainingData:
    """Loaders that decode per sample in worker processes: an image folder listed, or packed shards."""
    from ..data.shards import ShardLoader, open_shards
    from ..data.stream import FolderStreamLoader, open_image_folder, sample_channel_stats
    size = cfg.image_size or 224  # ImageNet's training crop
    if cfg.data_dir is None:
        raise ConfigError(f"{cfg.dataset} needs --data-dir; {get_spec(cfg.dataset).how_to_get}")
    shards = cfg.dataset == "shards"
    source = open_shards(cfg.data_dir) if shards else open_image_folder(cfg.data_dir)
    if shards and (cfg.train_subset or cfg.val_split):
        raise ConfigError("train_subset and val_split select images by index, which shards cannot; pack the "
                          "subset you want with 'cnnlab data pack' instead")
    if cfg.augment not in ("auto", "none"):
        raise ConfigError(f"augment {cfg.augment!r}: streamed data is augmented per sample (RandomResizedCrop and "
                          "flip); leave out --augment")
    mean, std = sample_channel_stats(source, size)  # an estimate from 256 training images
    common = dict(image_size=size, mean=mean, std=std, workers=cfg.workers, rank=runtime.rank,
                  world_size=runtime.world_size, device=runtime.device, channels_last=runtime.channels_last,
                  max_bad_images=None if cfg.max_bad_images < 0 else cfg.max_bad_images)
    eval_batch = max(cfg.batch_size // runtime.world_size, 256) * runtime.world_size
    if shards:
        extra = {"shuffle_buffer": cfg.shuffle_buffer}
        train = ShardLoader(source, "train", cfg.batch_size, train=True, seed=cfg.seed + 1, **common, **extra)
        test = ShardLoader(source, "test", eval_batch, train=False, **common)
        val = None
        names = json.dumps([e["sha256"] for split in ("train", "test") for e in source.shards(split)])
        files = [{"file": str(source.root / "manifest.json"), "sha256": hashlib.sha256(names.encode()).hexdigest(),
                  "status": "own files"}]
        test_labels, train_labels = None, torch.zeros(0)
    else:
        indices = np.arange(source.count("train"))[:cfg.train_subset or None]
        val_idx = None
        if cfg.val_split:
            order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(cfg.seed)).numpy()
            n_val = int(round(len(indices) * cfg.val_split))
            indices, val_idx = indices[order[n_val:]], indices[order[:n_val]]
        train = FolderStreamLoader(source, "train", cfg.batch_size, train=True, seed=cfg.seed + 1, indices=indices,
                                   **common)
        test = FolderStreamLoader(source, "test", eval_batch, train=False, **common)
        val = None if val_idx is None else FolderStreamLoader(source, "train", eval_batch, train=False,
                                                              indices=val_idx, **common)
        split = source.splits["train"]
        names = "\n".join(split.names[i] for i in indices)
        files = [{"file": str(source.root), "sha256": hashlib.sha256(names.encode()).hexdigest(),
                  "status": "own files (sha256 of the training file list)"}]
        test_labels, train_labels = torch.from_numpy(source.labels("test")), torch.from_numpy(split.labels[indices])
    if len(train) == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training split; lower --batch-size")
    dataset = StreamedDataset(cfg.dataset, str(source.root), list(source.classes),
                              {"train": source.count("train"), "test": source.count("test")}, size, files, test_labels)
    fingerprint = hashlib.sha256((files[0]["sha256"] + str(size)).encode() + train_labels.numpy().tobytes()).hexdigest()
    return TrainingData(train, test, val, list(source.classes), (source.channels, size, size), mean, std,
                        "RandomResizedCrop+flip", fingerprint, dataset, "stream", reason)


def _model_args(cfg: TrainConfig, shape: tuple[int, int, int], num_classes: int) -> dict:
    args = {"num_classes": num_classes, "in_channels": shape[0], **cfg.model_args}
    if accepts(cfg.model, "input_size"):  # nets with a flatten layer; pooled nets take any size
        args = {"input_size": list(shape[1:]), **args}
    return args


def build_model(cfg: TrainConfig, data: TrainingData, runtime: Runtime) -> tuple[nn.Module, dict]:
    """The model on its device and memory format, initialised from --init-from weights or, for a model that
    asks (`model.prepare`), from the training data; returns (model, architecture)."""
    model_args = _model_args(cfg, data.shape, len(data.classes))
    model = create_model(cfg.model, **model_args)
    if cfg.init_from:
        source = load_weights(cfg.init_from, "cpu")
        if (source.meta["model"], source.meta["model_args"]) != (cfg.model, json.loads(json.dumps(model_args))):
            raise ConfigError(f"--init-from {cfg.init_from}: it holds a {source.meta['model']!r} with "
                              f"{source.meta['model_args']}, not {cfg.model!r} with {model_args}")
        model.load_state_dict(source.model.state_dict())
    elif hasattr(model, "prepare") and data.train_images is not None:  # e.g. airbench94's whitening filters
        note = model.prepare(data.train_images, data.mean, data.std)
        if note and runtime.is_main:
            print(f"  {cfg.model}: {note}")
    if cfg.sync_bn and runtime.distributed:
        if runtime.device.type == "cpu":
            raise ConfigError("--sync-bn: PyTorch's SyncBatchNorm runs on GPUs only; on CPU each rank normalises "
                              "over its own batch_size / world_size images (leave out --sync-bn)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    return model, {"model": cfg.model, "model_args": model_args}


def build_training_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """--optimizer over the default parameter groups, or the model's own (--param-groups model), each group's
    learning rate relative to the schedule's."""
    groups = None
    if cfg.param_groups == "model":
        if not hasattr(model, "param_groups"):
            raise ConfigError(f"--param-groups model: {cfg.model} defines no parameter groups of its own; leave "
                              "out --param-groups (airbench94 has them)")
        groups = model.param_groups(batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
        for group in groups:
            group["lr_scale"] = group["lr"] / cfg.lr
    return build_optimizer(model, cfg.optimizer, cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, groups=groups)


# Accuracies whose first crossing the summary times (airbench's 94% among them).
ACCURACY_THRESHOLDS = (0.90, 0.93, 0.94)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np.random.seed(seed)


def _check_resumable(saved: dict, header: dict, folder: RunFolder, cfg: TrainConfig, lr_at, total_steps: int,
                     data: TrainingData) -> None:
    """Refuse a checkpoint of another architecture, other data, or a schedule the new length would redraw."""
    if saved.get("arch") != json.loads(json.dumps(header["arch"])):
        raise CheckpointError(f"{folder.path}: the checkpoint holds {saved.get('arch')}, not {header['arch']}; "
                              "start a new run instead of resuming")
    if saved.get("data") != header["data"]:
        raise CheckpointError(f"{folder.path}: the dataset found now ({data.dataset.source}) is not the one the run "
                              "was trained on, so the resumed run could not match; point --data-dir at the original copy")
    old_total, step = saved.get("total_steps", total_steps), int(saved["step"])
    if old_total == total_steps or step == 0:
        return
    try:
        old_cfg = config_from_dict(saved["config"])
        old_lr_at = build_schedule(old_cfg.schedule, old_cfg.lr, old_total, steps_per_epoch=len(data.train),
                                   **_schedule_options(old_cfg))
    except (CnnlabError, KeyError, TypeError):
        return  # a checkpoint from before schedules were recorded: nothing to compare with
    changed = next((s for s in range(step) if not np.isclose(old_lr_at(s), lr_at(s), rtol=1e-9, atol=0)), None)
    if changed is not None:
        raise ConfigError(
            f"cannot resume {folder.path} with {total_steps} steps: its {old_cfg.schedule} schedule was laid out over "
            f"{old_total} steps, and redrawing it would change the learning rate of steps already taken (step "
            f"{changed + 1}: {old_lr_at(changed):.3g} then, {lr_at(changed):.3g} now). Choices: resume with its "
            f"original length (--epochs {old_cfg.epochs}{f' --max-steps {old_cfg.max_steps}' if old_cfg.max_steps else ''}"
            f"); or start a new run from its weights with a fresh schedule: cnnlab train --init-from {folder.path} "
            "--epochs N (other flags as before); schedules that do not depend on the run's length (constant, or "
            "multistep with milestones in epochs or iterations) can be extended with --resume")


def _schedule_options(cfg: TrainConfig) -> dict:
    return dict(warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, warmup=cfg.warmup,
                milestones=cfg.milestones, milestone_unit=cfg.milestone_unit, gamma=cfg.gamma,
                lr_start_factor=cfg.lr_start_factor, lr_peak_fraction=cfg.lr_peak_fraction,
                lr_end_factor=cfg.lr_end_factor)


def _versions() -> dict:
    return {"cnnlab": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


@contextlib.contextmanager
def _explain_determinism_errors():
    """With --deterministic, PyTorch refuses ops that have no deterministic kernel on this device (e.g. some
    CUDA backward passes); say which and what to do, instead of a traceback."""
    try:
        yield
    except RuntimeError as exc:
        if "deterministic" not in str(exc) or not torch.are_deterministic_algorithms_enabled():
            raise
        raise TrainingError(f"--deterministic cannot be honoured here: {str(exc).splitlines()[0]} "
                            "Leave out --deterministic, or train on CPU") from None


def _quiet(message: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------- fit

def fit(cfg: TrainConfig, *, resume: bool | str = False, callbacks: Sequence[Callable[[RunState], None]] = (),
        log: Callable[[str], None] = print, loss_fn: Callable | None = None) -> dict:
    """Train `cfg.model` on `cfg.dataset`, evaluate on the test split, write the run folder; returns the summary.

    `resume`: True continues the run in `cfg.run_dir` from its last checkpoint; "auto" does so when it has
    one (workers restarted by torchrun do this by themselves). `loss_fn(logits, labels)` replaces the
    label-smoothed cross-entropy.
    """
    cfg.validate()
    wall_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # --- setup: where to compute, the data, the model, the optimiser, the schedule, the run folder
        runtime = stack.enter_context(start_runtime(cfg.device, cfg.precision, cfg.channels_last, cfg.threads,
                                                    cfg.deterministic, log))
        say = log if runtime.is_main else _quiet
        spec = get_spec(cfg.dataset)
        if spec.shape[0]:  # a named dataset's shape is known before loading it: check the model against it first
            shape = (spec.shape[0], *((cfg.image_size,) * 2 if cfg.image_size else spec.shape[1:]))
            check_input_size(cfg.model, _model_args(cfg, shape, len(spec.classes)), shape, what=cfg.dataset)
        _seed_everything(cfg.seed)
        data = load_training_data(cfg, runtime, say)
        stack.callback(lambda: [getattr(loader, "close", lambda: None)() for loader in (data.train, data.test, data.val)
                                if loader is not None])
        check_input_size(cfg.model, _model_args(cfg, data.shape, len(data.classes)), data.shape, what=cfg.dataset)
        model, arch = build_model(cfg, data, runtime)
        optimizer = build_training_optimizer(cfg, model)
        state = TrainState(model, optimizer, data.train)
        steps_per_epoch = len(data.train)
        total_steps = math.ceil(cfg.epochs * steps_per_epoch)
        total_steps = min(total_steps, cfg.max_steps or total_steps)
        lr_at = build_schedule(cfg.schedule, cfg.lr, total_steps, steps_per_epoch=steps_per_epoch,
                               **_schedule_options(cfg))
        if cfg.lookahead_every:
            state.extras["lookahead"] = Lookahead(model, cfg.lookahead_every, cfg.lookahead_start_epoch, total_steps)
        folder = RunFolder.choose(cfg, runtime)
        resume = folder.open(resume or ("auto" if runtime.restart_count else False), stack, say)
        cfg = dataclasses.replace(cfg, run_dir=str(folder.path))
        header = {"arch": arch, "data": data.fingerprint, "config": dataclasses.asdict(cfg),
                  "total_steps": total_steps}

        # --- resume: weights, optimiser, data position and every generator, exactly where they were
        if resume:
            saved = folder.load_checkpoint(say)
            _check_resumable(saved, header, folder, cfg, lr_at, total_steps, data)
            folder.restore(state, saved, say)
            summary_file = folder.path / "summary.json"
            if state.step >= total_steps and runtime.is_main and summary_file.is_file() and \
                    (folder.path / "model.safetensors").is_file():
                done = json.loads(summary_file.read_text())
                say(f"{folder.path} is finished ({done.get('epochs', 0):g} epochs, test accuracy "
                    f"{done.get('test_accuracy', float('nan')):.4f}); nothing to resume. To train longer, start a "
                    f"new run from its weights: cnnlab train --init-from {folder.path} --epochs N")
            if state.step >= total_steps and runtime.broadcast(summary_file.is_file()):
                return runtime.broadcast(json.loads(summary_file.read_text()) if runtime.is_main else None)
            say(f"resuming {folder.path} at epoch {data.train.epoch + 1}, step {state.step}")
        folder.write_config(cfg)
        clock = _Clock(state.notes.get("wall_seconds", 0.0), wall_start)

        def save_checkpoint() -> None:
            # An optimiser step can turn weights non-finite while its own loss was finite: never save those.
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise TrainingError(f"step {state.step}: the weights hold NaN or infinite values; training stopped "
                                    f"without overwriting the last good checkpoint in {folder.path}. Try a lower --lr "
                                    "or --grad-clip 1.0")
            state.notes["wall_seconds"] = clock()
            loggers.flush()
            folder.save_checkpoint(state, header)

        step_model = model
        if runtime.distributed:
            step_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
        if cfg.compile:
            step_model = torch.compile(step_model)
        loss_fn = loss_fn or cross_entropy(cfg.label_smoothing)
        rules = StepRules(total_steps, cfg.grad_clip, cfg.on_nan, cfg.max_nan_skips, cfg.checkpoint_every,
                          cfg.log_every)
        progress = Progress(cfg.progress if runtime.is_main else "none", total_steps, steps_per_epoch, cfg.log_every)
        loggers = stack.enter_context(build_loggers(cfg.logger, folder.path, config=cfg, resume=bool(resume),
                                                    start_step=state.step) if runtime.is_main else LoggerGroup())
        reached = _Thresholds(state.notes.setdefault("time_to_accuracy", {}), clock)
        run_state = RunState(folder.path, model=model)
        say(data.describe())
        say(f"  {data.mode_reason}")
        say(f"training {cfg.model} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
            f"{runtime.describe()}; run folder {folder.path}")
        say(f"  precision {runtime.precision}: {runtime.precision_reason}; "
            f"{'channels_last' if runtime.channels_last else 'NCHW'}: {runtime.channels_last_reason}")
        if data.dataset.verified is False:
            say("note: the dataset's bytes differ from the publisher's; it passed the structural checks and its "
                "sha256 sums are recorded in summary.json")

        def evaluate_now(per_image: bool = False, tta: int = 0) -> dict:
            if runtime.distributed:  # evaluate, and later save, rank 0's batch-norm statistics on every rank
                for buffer in model.buffers():
                    torch.distributed.broadcast(buffer, 0)
            return evaluate(model, data.test, len(data.classes), runtime=runtime, per_image=per_image, tta=tta)

        def evaluate_mid_epoch(step: int) -> None:
            if cfg.eval_every_steps and step % cfg.eval_every_steps == 0 and data.train.position < steps_per_epoch:
                result = evaluate_now()
                reached.update(result["accuracy"], step, step / steps_per_epoch)
                _append_eval(folder, step, step / steps_per_epoch, result, clock())

        # --- the epoch loop: train, evaluate, write the row, checkpoint
        final = None
        model.train()
        with SignalStop() as stopper, _explain_determinism_errors():
            while data.train.epoch < cfg.epochs and state.step < total_steps:
                epoch = data.train.epoch
                progress.start_epoch(epoch, cfg.epochs, state.step)
                try:
                    stop = train_one_epoch(state, step_model, loss_fn, lr_at, runtime, rules, stopper=stopper,
                                           progress=progress, callbacks=callbacks, run_state=run_state,
                                           save_checkpoint=save_checkpoint, log=say, between_steps=evaluate_mid_epoch,
                                           on_step=_step_logger(loggers))
                except NonFiniteStep as exc:
                    kept = f"the last good checkpoint is kept in {folder.path}" if folder.checkpoints.exists() else \
                        "no checkpoint had been written yet"
                    skipped = f" after {exc.skipped} skipped steps" if cfg.on_nan == "skip" else ""
                    raise TrainingError(f"{exc}; training stopped{skipped}, {kept}. Try a lower --lr, --grad-clip "
                                        "1.0 or --on-nan skip") from None
                if stop is not None:
                    save_checkpoint()
                    progress.close()
                    code = 128 + stop if isinstance(stop, int) else 130
                    raise TrainingInterrupted(f"stopped at step {state.step}; checkpoint saved. Resume with: "
                                              f"cnnlab train --resume {folder.path}", code)
                if "lookahead" in state.extras:
                    state.extras["lookahead"].end_epoch()
                partial = data.train.position > 0  # max_steps (or fractional epochs) reached mid-epoch
                last = partial or data.train.epoch >= cfg.epochs or state.step >= total_steps
                trace(f"evaluate epoch {epoch + 1}")
                wanted = last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)
                test = evaluate_now(per_image=last and not cfg.tta) if wanted else None
                final = test if last and not cfg.tta else final
                progress_epochs = epoch + data.train.position / steps_per_epoch if partial else epoch + 1
                if test:
                    reached.update(test["accuracy"], state.step, progress_epochs)
                row = _epoch_row(progress_epochs, lr_at(max(state.step - 1, 0)), state.sums, test,
                                 evaluate(model, data.val, len(data.classes), runtime=runtime)
                                 if data.val is not None and wanted else None, data.val is not None)
                state.history.append(row)
                state.sums = type(state.sums)()
                folder.write_metrics(state.history)
                loggers.log_epoch(epoch + 1, state.step, row)
                save_checkpoint()
                tested = f" | test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}" if test else ""
                progress.end_epoch(f"epoch {row['epoch']:g}/{cfg.epochs:g}: train loss {row['train_loss']:.4f} acc "
                                   f"{row['train_acc']:.4f}{tested} | {row['seconds']:.1f}s, {row['img_per_s']:,.0f} img/s")
        progress.close()

        # --- the finish: the final evaluation (with test-time augmentation if asked), weights, summary
        if final is None:
            final = evaluate_now(per_image=True, tta=cfg.tta)
            reached.update(final["accuracy"], state.step, state.step / steps_per_epoch)
        meta = {"model": cfg.model, "model_args": arch["model_args"], "classes": data.classes, "mean": data.mean,
                "std": data.std, "input_shape": list(data.shape), "dataset": cfg.dataset, "cnnlab_version": __version__}
        losses, preds = final.pop("losses"), final.pop("preds")
        if runtime.is_main:
            save_weights(model, folder.path / "model.safetensors", meta)
            labels = data.dataset.test_labels
            if labels is not None and len(labels) == len(preds):  # streaming may have skipped unreadable images
                folder.write_predictions(losses, preds, labels)
        bad = data.bad_images()
        summary = {
            "test_accuracy": final["accuracy"], "test_loss": final["loss"], "test_top5": final.get("top5"),
            "test_tta": cfg.tta, "test_per_class": final["per_class"], "test_confusion": final["confusion"],
            "time_to_accuracy": reached.table(), "epochs": round(state.step / steps_per_epoch, 4), "steps": state.step,
            "train_seconds": sum(r["seconds"] for r in state.history), "wall_seconds": clock(),
            **runtime.as_dict(), "augment": data.augment, "data_mode": data.mode, "data_mode_reason": data.mode_reason,
            "bad_images": {"count": len(bad), "files": bad[:1000]}, "versions": _versions(),
            "dataset": {"name": data.dataset.name, "source": data.dataset.source, "verified": data.dataset.verified,
                        "files": data.dataset.files},
            "seed": cfg.seed, "run_dir": str(folder.path), "nan_skipped": state.nan_skipped,
            # every generator's seed, so that a result can be traced and replayed
            "seeds": {"model_init": cfg.seed, "python_random": cfg.seed, "numpy_random": cfg.seed,
                      "data_order": cfg.seed + 1, "augmentation": cfg.seed + 2,
                      "validation_split": cfg.seed if cfg.val_split else None},
            "deterministic": {"requested": cfg.deterministic,
                              "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                              "cudnn_benchmark": torch.backends.cudnn.benchmark,
                              "cudnn_deterministic": torch.backends.cudnn.deterministic},
        }
        folder.write_json("summary.json", summary)
        loggers.log_summary(summary)
    return summary


def _step_logger(loggers: LoggerGroup):
    """What the loop calls after each step, when a logger wants per-step points (none for csv alone)."""
    if not loggers.loggers:
        return None
    return lambda step, loss, lr: loggers.log_step(step, {"train_loss": loss, "lr": lr})


class _Clock:
    """Wall seconds of the whole run: those before the last resume plus those of this process."""

    def __init__(self, before: float, start: float):
        self.before, self.start = before, start

    def __call__(self) -> float:
        return self.before + time.perf_counter() - self.start


class _Thresholds:
    """When each accuracy threshold was first reached: wall seconds, step and epochs (kept in checkpoints)."""

    def __init__(self, reached: dict, clock: _Clock):
        self.reached, self.clock = reached, clock

    def update(self, accuracy: float, step: int, epochs: float) -> None:
        for threshold in ACCURACY_THRESHOLDS:
            key = f"{threshold:.2f}"
            if accuracy >= threshold and key not in self.reached:
                self.reached[key] = {"wall_seconds": round(self.clock(), 3), "step": step,
                                     "epochs": round(epochs, 4), "accuracy": accuracy}

    def table(self) -> dict:
        return dict(self.reached)


def _append_eval(folder: RunFolder, step: int, epochs: float, result: dict, seconds: float) -> None:
    """One row of evals.csv: a mid-epoch evaluation (--eval-every-steps)."""
    if not folder.runtime.is_main:
        return
    path = folder.path / "evals.csv"
    previous = path.read_text() if path.is_file() else "step,epochs,wall_seconds,test_loss,test_acc\n"
    line = f"{step},{epochs:.4f},{seconds:.3f},{result['loss']:.6f},{result['accuracy']:.6f}\n"
    folder.write("evals.csv", (previous + line).encode())


def _epoch_row(epoch: float, lr: float, sums, test: dict | None, val: dict | None, has_val: bool) -> dict:
    """One metrics.csv row; test (and val) columns stay empty in epochs without an evaluation. `epoch` is
    fractional for a last epoch cut short by --max-steps."""
    row = {"epoch": round(epoch, 4) if epoch % 1 else int(epoch), "lr": lr,
           "train_loss": sums.loss / max(sums.seen, 1), "train_acc": sums.correct / max(sums.seen, 1),
           "test_loss": test["loss"] if test else "", "test_acc": test["accuracy"] if test else "",
           "seconds": sums.seconds, "img_per_s": sums.seen / max(sums.seconds, 1e-9)}
    if has_val:
        row["val_loss"], row["val_acc"] = (val["loss"], val["accuracy"]) if val else ("", "")
    return row
