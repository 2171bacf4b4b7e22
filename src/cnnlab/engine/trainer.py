"""`fit(config)`: the whole training run, from dataset to weights, on one process or many (torchrun), resumable
bit for bit on CPU. Read top to bottom: setup, resume, the epoch loop, the finish."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
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
                   "mnist": "none", "imagefolder": "flip",
                   # the synthetic stand-ins do the work of the datasets whose shape they have
                   "synthetic-cifar": "crop:4:reflect,flip", "synthetic-imagenet": "flip"}

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
    dataset: object  # cnnlab.data.Dataset: name, source, verified, files, test labels

    def describe(self) -> str:
        return self.dataset.describe()


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


def load_training_data(cfg: TrainConfig, runtime: Runtime, log: Callable[[str], None] = print) -> TrainingData:
    """Find and decode the dataset, split it, compute the normalisation, and build this rank's loaders."""
    if cfg.download and runtime.distributed:  # one download, by rank 0, before the others look
        if runtime.is_main:
            load_dataset(cfg.dataset, cfg.data_dir, download=True, log=log)
        runtime.barrier()
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, log=log, write_cache=runtime.is_main)
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
                        _fingerprint(data, train_y, val_y), data)


def _model_args(cfg: TrainConfig, shape: tuple[int, int, int], num_classes: int) -> dict:
    args = {"num_classes": num_classes, "in_channels": shape[0], **cfg.model_args}
    if accepts(cfg.model, "input_size"):  # nets with a flatten layer; pooled nets take any size
        args = {"input_size": list(shape[1:]), **args}
    return args


def build_model(cfg: TrainConfig, shape: tuple[int, int, int], num_classes: int, runtime: Runtime
                ) -> tuple[nn.Module, dict]:
    """The model on its device and memory format, with --init-from weights; returns (model, architecture)."""
    model_args = _model_args(cfg, shape, num_classes)
    model = create_model(cfg.model, **model_args)
    if cfg.init_from:
        source = load_weights(cfg.init_from, "cpu")
        if (source.meta["model"], source.meta["model_args"]) != (cfg.model, json.loads(json.dumps(model_args))):
            raise ConfigError(f"--init-from {cfg.init_from}: it holds a {source.meta['model']!r} with "
                              f"{source.meta['model_args']}, not {cfg.model!r} with {model_args}")
        model.load_state_dict(source.model.state_dict())
    if cfg.sync_bn and runtime.distributed:
        if runtime.device.type == "cpu":
            raise ConfigError("--sync-bn: PyTorch's SyncBatchNorm runs on GPUs only; on CPU each rank normalises "
                              "over its own batch_size / world_size images (leave out --sync-bn)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    return model, {"model": cfg.model, "model_args": model_args}


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
                milestones=cfg.milestones, milestone_unit=cfg.milestone_unit, gamma=cfg.gamma)


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
        spec_shape = get_spec(cfg.dataset).shape
        if spec_shape[0]:  # a named dataset's shape is known before loading it: check the model against it first
            check_input_size(cfg.model, _model_args(cfg, spec_shape, len(get_spec(cfg.dataset).classes)),
                             (spec_shape[0], *((cfg.image_size,) * 2 if cfg.image_size else spec_shape[1:])),
                             what=cfg.dataset)
        _seed_everything(cfg.seed)
        data = load_training_data(cfg, runtime, say)
        check_input_size(cfg.model, _model_args(cfg, data.shape, len(data.classes)), data.shape,
                         what=cfg.dataset)
        model, arch = build_model(cfg, data.shape, len(data.classes), runtime)
        optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay)
        state = TrainState(model, optimizer, data.train)
        steps_per_epoch = len(data.train)
        total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch)
        lr_at = build_schedule(cfg.schedule, cfg.lr, total_steps, steps_per_epoch=steps_per_epoch,
                               **_schedule_options(cfg))
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

        def save_checkpoint() -> None:
            # An optimiser step can turn weights non-finite while its own loss was finite: never save those.
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise TrainingError(f"step {state.step}: the weights hold NaN or infinite values; training stopped "
                                    f"without overwriting the last good checkpoint in {folder.path}. Try a lower --lr "
                                    "or --grad-clip 1.0")
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
        run_state = RunState(folder.path, model=model)
        say(data.describe())
        say(f"training {cfg.model} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
            f"{runtime.describe()}; run folder {folder.path}")
        say(f"  precision {runtime.precision}: {runtime.precision_reason}; "
            f"{'channels_last' if runtime.channels_last else 'NCHW'}: {runtime.channels_last_reason}")
        if data.dataset.verified is False:
            say("note: the dataset's bytes differ from the publisher's; it passed the structural checks and its "
                "sha256 sums are recorded in summary.json")

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
                                           save_checkpoint=save_checkpoint, log=say)
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
                partial = data.train.position > 0  # max_steps reached mid-epoch
                last = partial or data.train.epoch >= cfg.epochs or state.step >= total_steps
                trace(f"evaluate epoch {epoch + 1}")
                evaluate_now = last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)
                if runtime.distributed:  # evaluate, and later save, rank 0's batch-norm statistics on every rank
                    for buffer in model.buffers():
                        torch.distributed.broadcast(buffer, 0)
                test = evaluate(model, data.test, len(data.classes), runtime=runtime, per_image=last) \
                    if evaluate_now else None
                final = test if last else final
                row = _epoch_row(epoch + data.train.position / steps_per_epoch if partial else epoch + 1,
                                 lr_at(max(state.step - 1, 0)), state.sums, test,
                                 evaluate(model, data.val, len(data.classes), runtime=runtime)
                                 if data.val is not None and evaluate_now else None, data.val is not None)
                state.history.append(row)
                state.sums = type(state.sums)()
                folder.write_metrics(state.history)
                save_checkpoint()
                tested = f" | test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}" if test else ""
                progress.end_epoch(f"epoch {row['epoch']:g}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc "
                                   f"{row['train_acc']:.4f}{tested} | {row['seconds']:.1f}s, {row['img_per_s']:,.0f} img/s")
        progress.close()

        # --- the finish: the final evaluation, weights, predictions and summary
        if final is None:  # resumed after the last epoch's checkpoint but before the summary was written
            final = evaluate(model, data.test, len(data.classes), runtime=runtime, per_image=True)
        meta = {"model": cfg.model, "model_args": arch["model_args"], "classes": data.classes, "mean": data.mean,
                "std": data.std, "input_shape": list(data.shape), "dataset": cfg.dataset, "cnnlab_version": __version__}
        if runtime.is_main:
            save_weights(model, folder.path / "model.safetensors", meta)
            folder.write_predictions(final.pop("losses"), final.pop("preds"), data.dataset.test_labels)
        summary = {
            "test_accuracy": final["accuracy"], "test_loss": final["loss"], "test_top5": final.get("top5"),
            "test_per_class": final["per_class"], "test_confusion": final["confusion"],
            "epochs": round(state.step / steps_per_epoch, 4), "steps": state.step,
            "train_seconds": sum(r["seconds"] for r in state.history), "wall_seconds": time.perf_counter() - wall_start,
            **runtime.as_dict(), "augment": data.augment, "versions": _versions(),
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
    return summary


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
