"""`fit(config)`: the whole training run, from dataset to weights, on one process or many (torchrun), resumable
bit for bit on CPU. Read top to bottom: setup, resume, the epoch loop, the finish."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .._version import __version__
from ..data import get_spec
from ..errors import CheckpointError, CnnlabError, ConfigError
from ..inference.evaluate import evaluate
from ..inference.weights import load_weights, save_weights
from ..models import create_model
from ..models.summary import check_input_size
from ..run import Run, is_run_folder, open_run
from .config import TrainConfig, config_from_dict, yaml_dump
from .loggers import LoggerGroup, build_loggers
from .lookahead import Lookahead
from .loop import EpochSteps, NonFiniteStep, RunState, SignalStop, StepRules
from .lr_find import DEFAULT_END_LR, DEFAULT_START_LR, DEFAULT_STEPS, LRFinderResult, search_lr
from .optim import applied_lrs, build_schedule, build_training_optimizer
from .progress import Progress, trace
from .run_folder import RunFolder
from .runtime import Runtime, settle_for_model, start_runtime
from .state import TrainState
from .training_data import TrainingData, load_training_data

__all__ = [
    "fit",
    "train",
    "lr_find",
    "resume_config",
    "TrainingError",
    "TrainingInterrupted",
    "RunState",
    "TrainingData",
    "load_training_data",
    "build_model",
    "cross_entropy",
]

# Keys that fix the architecture and data: a resumed run may not change them.
_FROZEN_ON_RESUME = (
    "model",
    "model_args",
    "dataset",
    "batch_size",
    "seed",
    "train_subset",
    "val_split",
    "augment",
    "image_size",
    "init_from",
    "optimizer",
    "param_groups",
    "momentum",
    "nesterov",
    "weight_decay",
    "lookahead_every",
    "lookahead_start_epoch",
)


class TrainingError(CnnlabError):
    """Training cannot go on (a NaN loss, say); the last good checkpoint is kept."""


class TrainingInterrupted(CnnlabError):
    """Stopped by SIGINT/SIGTERM or a callback at a step boundary, after writing a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def resume_config(
    run_dir: str | Path, overrides: TrainConfig | None = None, changed: Sequence[str] = ()
) -> TrainConfig:
    """The run's own config, with the flags in `changed` taken from `overrides`; architecture changes refused."""
    run = Run(run_dir)
    if not is_run_folder(run.path):
        raise CheckpointError(f"{run.path}: not a run folder (no config.yaml); give the folder 'cnnlab train' made")
    cfg = run.config
    if cfg.data_dir and "data_dir" not in changed:  # where the data was found, from whatever folder we run in
        cfg = dataclasses.replace(cfg, data_dir=run.data_dir())
    for key in changed:
        new = getattr(overrides, key)
        if key in _FROZEN_ON_RESUME and new != getattr(cfg, key):
            raise CheckpointError(
                f"cannot resume {run_dir} with {key} = {new!r}: the run was made with "
                f"{getattr(cfg, key)!r}. Start a new run instead (without --resume)"
            )
        cfg = dataclasses.replace(cfg, **{key: new})
    return dataclasses.replace(cfg, run_dir=str(run.path))


def train(
    config: TrainConfig | None = None,
    *,
    callbacks: Sequence[Callable[[RunState], None]] = (),
    log: Callable[[str], None] = print,
    **fields,
) -> Run:
    """`fit` in one call, returning the finished run: `train(model="convnet", dataset="cifar10", epochs=4)`.
    Keywords are TrainConfig fields and override `config` (default: TrainConfig's defaults)."""
    cfg = config_from_dict(fields, base=config, source="train()")
    summary = fit(cfg, callbacks=callbacks, log=log)
    return open_run(summary["run_dir"])


def lr_find(
    config: TrainConfig | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    start_lr: float = DEFAULT_START_LR,
    end_lr: float = DEFAULT_END_LR,
    rule: str = "steepest",
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
    **fields,
) -> LRFinderResult:
    """The range test (training/lr_find.py) for the run `config` (keyword fields overriding it) would train: its
    data, model, initialisation, optimiser and parameter groups, set up as `fit` sets them up. With `out`, writes
    lr_find.json and lr_find.png there (rank 0). `cnnlab lr-find` is this."""
    cfg = config_from_dict(dict(fields), base=config, source="lr_find()").validate()
    with contextlib.ExitStack() as stack:
        cfg, setup = _set_up(cfg, stack, log)
        result = search_lr(
            setup.model,
            build_training_optimizer(setup.model, **cfg.optimizer_options()),
            setup.data.train,
            runtime=setup.runtime,
            loss_fn=cross_entropy(cfg.label_smoothing),
            step_model=_wrap_for_training(setup.model, setup.runtime, cfg.compile),
            steps=steps,
            start_lr=start_lr,
            end_lr=end_lr,
            rule=rule,
            grad_clip=cfg.grad_clip,
        )
        if out is not None and setup.runtime.is_main:
            result.save(out)
        setup.say(result.describe())
    return result


def cross_entropy(label_smoothing: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The default loss: mean cross-entropy of float32 logits, with label smoothing."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)

    return loss


# ---------------------------------------------------------------------------------------------- setup pieces


def build_model(
    name: str,
    kwargs: dict,
    data: TrainingData,
    runtime: Runtime,
    *,
    init_from: str | None = None,
    sync_bn: bool = False,
) -> tuple[nn.Module, dict]:
    """The model on its device and memory format, initialised from `init_from` weights or, for a model that
    asks (`model.prepare`), from the training data; returns (model, architecture)."""
    model = create_model(name, **kwargs)
    if init_from:
        source = load_weights(init_from, "cpu")
        if (source.meta["model"], source.meta["model_args"]) != (name, json.loads(json.dumps(kwargs))):
            raise ConfigError(
                f"--init-from {init_from}: it holds a {source.meta['model']!r} with "
                f"{source.meta['model_args']}, not {name!r} with {kwargs}"
            )
        model.load_state_dict(source.model.state_dict())
    elif hasattr(model, "prepare") and data.train_images is not None:  # e.g. airbench94's whitening filters
        note = cast(Any, model).prepare(data.train_images, data.mean, data.std)  # not a Module method
        if note and runtime.is_main:
            print(f"  {name}: {note}")
    if sync_bn and runtime.distributed:
        if runtime.device.type == "cpu":
            raise ConfigError(
                "--sync-bn: PyTorch's SyncBatchNorm runs on GPUs only; on CPU each rank normalises "
                "over its own batch_size / world_size images (leave out --sync-bn)"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Module.to takes memory_format at run time; its stub does not list it
    model = model.to(runtime.device, memory_format=runtime.memory_format)  # type: ignore[call-overload]
    return model, {"model": name, "model_args": kwargs}


def settle_precision(
    runtime: Runtime, model: nn.Module, arch: dict, data: TrainingData, *, batch_size: int, run_steps: int, say
) -> None:
    """`--precision auto` / `--channels-last auto` on a CPU: measure the run's own model at its input size
    (runtime.settle_for_model) and move the model and the loaders to the memory format it picks."""
    run_images = run_steps * batch_size / runtime.world_size
    if settle_for_model(
        runtime,
        model,
        data.shape,
        batch_size // runtime.world_size,
        run_images,
        name=arch["model"],
        args=arch["model_args"],
        log=say,
    ):
        # Module.to takes memory_format at run time; its stub does not list it
        model.to(memory_format=runtime.memory_format)  # type: ignore[call-overload]
        data.use_channels_last(runtime.channels_last)


def planned_steps(epochs: float, steps_per_epoch: int, max_steps: int = 0) -> int:
    """Optimiser steps of a run: epochs x steps per epoch, rounded up, capped by max_steps (0: no cap)."""
    planned = math.ceil(round(epochs * steps_per_epoch, 6))  # 1.1 * 50 is 55.000000000000007 in floats
    return min(planned, max_steps or planned)


@dataclasses.dataclass
class Setup:
    """What fit and lr_find build the same way before any step: where to compute, the data, the model."""

    runtime: Runtime
    say: Callable[[str], None]
    data: TrainingData
    model: nn.Module
    arch: dict


def _set_up(cfg: TrainConfig, stack: contextlib.ExitStack, log: Callable[[str], None]) -> tuple[TrainConfig, Setup]:
    """The runtime (device, precision, processes), rank 0's config for every rank, the data and the model, checked
    against each other before any work; the precision probe on the real model. Closed by `stack`."""
    runtime = stack.enter_context(
        start_runtime(cfg.device, cfg.precision, cfg.channels_last, cfg.threads, cfg.deterministic, log)
    )
    cfg = runtime.broadcast(cfg)  # rank 0's config for all: ranks on other machines may read other files
    say = log if runtime.is_main else _quiet
    spec = get_spec(cfg.dataset)  # a named dataset's shape is known before loading it: check the model first
    if spec.shape[0]:
        shape = (spec.shape[0], *((cfg.image_size,) * 2 if cfg.image_size else spec.shape[1:]))
        check_input_size(cfg.model, cfg.model_kwargs(shape, len(spec.classes)), shape, what=cfg.dataset)
    _seed_everything(cfg.seed)
    data = load_training_data(cfg, runtime, say)
    stack.callback(data.close)
    kwargs = cfg.model_kwargs(data.shape, len(data.classes))
    check_input_size(cfg.model, kwargs, data.shape, what=cfg.dataset)
    model, arch = build_model(cfg.model, kwargs, data, runtime, init_from=cfg.init_from, sync_bn=cfg.sync_bn)
    settle_precision(
        runtime,
        model,
        arch,
        data,
        batch_size=cfg.batch_size,
        say=say,
        run_steps=planned_steps(cfg.epochs, len(data.train), cfg.max_steps),
    )
    return cfg, Setup(runtime, say, data, model, arch)


# Accuracies whose first crossing the summary times (airbench's 94% among them).
ACCURACY_THRESHOLDS = (0.90, 0.93, 0.94)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np.random.seed(seed)


def _check_resumable(saved: dict, header: dict, folder: RunFolder, lr_at, total_steps: int, data: TrainingData) -> None:
    """Refuse a checkpoint of another architecture, other data, or a schedule the new length would redraw."""
    if saved.get("arch") != json.loads(json.dumps(header["arch"])):
        raise CheckpointError(
            f"{folder.path}: the checkpoint holds {saved.get('arch')}, not {header['arch']}; "
            "start a new run instead of resuming"
        )
    if saved.get("data") != header["data"]:
        raise CheckpointError(
            f"{folder.path}: the dataset found now ({data.dataset.source}) is not the one the run "
            "was trained on, so the resumed run could not match; point --data-dir at the original copy"
        )
    streams = saved.get("loader", {}).get("streams")
    if streams is not None and streams != getattr(data.train, "streams", streams):
        raise ConfigError(
            f"{folder.path}: the run read its shards as {streams} streams (--workers {streams}); resume it "
            "with the same --workers, which fixes the order of the samples"
        )
    old_total, step = saved.get("total_steps", total_steps), int(saved["step"])
    if old_total == total_steps or step == 0:
        return
    try:
        old_cfg = config_from_dict(saved["config"])
        old_lr_at = build_schedule(
            old_cfg.schedule, old_cfg.lr, old_total, steps_per_epoch=len(data.train), **old_cfg.schedule_options()
        )
    except (CnnlabError, KeyError, TypeError):
        return  # a checkpoint from before schedules were recorded: nothing to compare with
    changed = next((s for s in range(step) if not np.isclose(old_lr_at(s), lr_at(s), rtol=1e-9, atol=0)), None)
    if changed is not None:
        raise ConfigError(
            f"cannot resume {folder.path} with {total_steps} steps: its {old_cfg.schedule} schedule was laid out over "
            f"{old_total} steps, and redrawing it would change the learning rate of steps already taken (step "
            f"{changed + 1}: {old_lr_at(changed):.3g} then, {lr_at(changed):.3g} now). Choices: resume with its "
            f"original length (--epochs {old_cfg.epochs:g}{f' --max-steps {old_cfg.max_steps}' if old_cfg.max_steps else ''}"
            f"); or start a new run from its weights with a fresh schedule: cnnlab train --init-from {folder.path} "
            "--epochs N (other flags as before); schedules that do not depend on the run's length (constant, or "
            "multistep with milestones in epochs or iterations) can be extended with --resume"
        )


def _versions() -> dict:
    return {
        "cnnlab": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


@contextlib.contextmanager
def _explain_determinism_errors():
    """With --deterministic, PyTorch refuses ops that have no deterministic kernel on this device (e.g. some
    CUDA backward passes); say which and what to do, instead of a traceback."""
    try:
        yield
    except RuntimeError as exc:
        if "deterministic" not in str(exc) or not torch.are_deterministic_algorithms_enabled():
            raise
        raise TrainingError(
            f"--deterministic cannot be honoured here: {str(exc).splitlines()[0]} "
            "Leave out --deterministic, or train on CPU"
        ) from None


def _quiet(message: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------- fit


def fit(
    cfg: TrainConfig,
    *,
    resume: bool | str = False,
    callbacks: Sequence[Callable[[RunState], None]] = (),
    log: Callable[[str], None] = print,
    loss_fn: Callable | None = None,
) -> dict:
    """Train `cfg.model` on `cfg.dataset`, evaluate on the test split, write the run folder; returns the summary.

    `resume`: True continues the run in `cfg.run_dir` from its last checkpoint; "auto" does so when it has
    one (workers restarted by torchrun do this by themselves). `loss_fn(logits, labels)` replaces the
    label-smoothed cross-entropy.
    """
    cfg.validate()
    if cfg.data_dir:  # recorded beside the path as typed, so eval, the report and resume find the data anywhere
        cfg = dataclasses.replace(cfg, data_dir_resolved=str(Path(cfg.data_dir).resolve()))
    wall_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # --- setup: where to compute, the data, the model, the optimiser, the schedule, the run folder
        cfg, setup = _set_up(cfg, stack, log)
        runtime, say, data, model, arch = setup.runtime, setup.say, setup.data, setup.model, setup.arch
        state = TrainState(model, build_training_optimizer(model, **cfg.optimizer_options()), data.train)
        steps_per_epoch = len(data.train)
        total_steps = planned_steps(cfg.epochs, steps_per_epoch, cfg.max_steps)
        lr_at = build_schedule(
            cfg.schedule, cfg.lr, total_steps, steps_per_epoch=steps_per_epoch, **cfg.schedule_options()
        )
        if cfg.lookahead_every:
            state.extras["lookahead"] = Lookahead(model, cfg.lookahead_every, cfg.lookahead_start_epoch, total_steps)
        folder = RunFolder.choose(cfg.run_dir, cfg.runs_root, cfg.model, cfg.dataset, runtime)
        resume = folder.open(resume or ("restart" if runtime.restart_count else False), stack, say)
        cfg = dataclasses.replace(cfg, run_dir=str(folder.path))
        step_model = None
        if cfg.lr_find and not resume:  # decided before config.yaml and the checkpoints record the lr
            # the range test on the run's own model, optimiser and data (all restored afterwards), then a fresh
            # optimiser at the suggested lr: the run trains exactly as one started with `--lr <suggestion>`
            step_model = _wrap_for_training(model, runtime, cfg.compile)
            found = search_lr(
                state.model,
                state.optimizer,
                state.loader,
                runtime=runtime,
                step_model=step_model,
                loss_fn=loss_fn or cross_entropy(cfg.label_smoothing),
                grad_clip=cfg.grad_clip,
            )
            if runtime.is_main:
                found.save(folder.path)
            say(found.describe())
            state.notes["lr_find"] = found.summary()
            cfg = dataclasses.replace(cfg, lr=found.suggestion)
            state.optimizer = build_training_optimizer(model, **cfg.optimizer_options())
            lr_at = build_schedule(
                cfg.schedule, cfg.lr, total_steps, steps_per_epoch=steps_per_epoch, **cfg.schedule_options()
            )
        header = {"arch": arch, "data": data.fingerprint, "config": dataclasses.asdict(cfg), "total_steps": total_steps}

        # --- resume: weights, optimiser, data position and every generator, exactly where they were
        if resume:
            finished = _resume(state, folder, header, lr_at, total_steps, data, say)
            if finished is not None:
                return finished
        folder.write("config", yaml_dump(cfg))
        clock = _Clock(state.notes.get("wall_seconds", 0.0), wall_start)
        loggers = stack.enter_context(
            build_loggers(cfg.logger, folder.path, config=cfg, resume=bool(resume), start_step=state.step)
            if runtime.is_main
            else LoggerGroup()
        )

        def save_checkpoint() -> None:
            # An optimiser step can turn weights non-finite while its own loss was finite: never save those.
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise TrainingError(
                    f"step {state.step}: the weights hold NaN or infinite values; training stopped "
                    f"without overwriting the last good checkpoint in {folder.path}. Try a lower --lr "
                    "or --grad-clip 1.0"
                )
            data.check_bad_images(runtime)
            state.notes["wall_seconds"] = clock()
            loggers.flush()
            folder.save_checkpoint(state, header)

        def evaluate_now(per_image: bool = False, tta: int = 0, split: str = "test") -> dict:
            if runtime.distributed:  # evaluate, and later save, rank 0's batch-norm statistics on every rank
                for buffer in model.buffers():
                    torch.distributed.broadcast(buffer, 0)
            started = clock()  # every evaluation's time is kept apart from training's (eval_seconds)
            result = evaluate(
                model, getattr(data, split), len(data.classes), runtime=runtime, per_image=per_image, tta=tta
            )
            state.notes["eval_seconds"] = state.notes.get("eval_seconds", 0.0) + clock() - started
            return result

        if step_model is None:
            step_model = _wrap_for_training(model, runtime, cfg.compile)
        rules = StepRules(total_steps, cfg.grad_clip, cfg.on_nan, cfg.max_nan_skips, cfg.log_every)
        progress = Progress(cfg.progress if runtime.is_main else "none", total_steps, steps_per_epoch, cfg.log_every)
        reached = _Thresholds(
            state.notes.setdefault("time_to_accuracy", {}),
            clock,
            lambda: clock() - state.notes.get("eval_seconds", 0.0),
        )
        run_state = RunState(folder.path, model=model)
        _say_setup(say, cfg.model, data, model, runtime, folder)

        # --- the epoch loop: train, evaluate, write the row, checkpoint
        final = None
        model.train()
        with SignalStop() as stopper, _explain_determinism_errors():
            while data.train.epoch < cfg.epochs and state.step < total_steps:
                epoch = data.train.epoch
                progress.start_epoch(epoch, cfg.epochs, state.step)
                steps = EpochSteps(
                    state,
                    step_model,
                    loss_fn or cross_entropy(cfg.label_smoothing),
                    lr_at,
                    runtime,
                    rules,
                    stopper=stopper,
                    progress=progress,
                    callbacks=callbacks,
                    run_state=run_state,
                    log=say,
                    on_step=_step_logger(loggers, state.optimizer),
                )
                try:
                    for step in steps:  # each step's boundary; mid-epoch only (the epoch's end is below)
                        mid_epoch = data.train.position < steps_per_epoch
                        if cfg.eval_every_steps and step % cfg.eval_every_steps == 0 and mid_epoch:
                            with steps.paused():  # for the times to accuracy; not training time
                                result = evaluate_now()
                                reached.update(result["accuracy"], step, step / steps_per_epoch)
                                _append_eval(folder, step, step / steps_per_epoch, result, clock())
                        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and mid_epoch:
                            steps.fold()
                            save_checkpoint()
                except NonFiniteStep as exc:
                    kept = (
                        f"the last good checkpoint is kept in {folder.path}"
                        if folder.checkpoints.exists()
                        else "no checkpoint had been written yet"
                    )
                    skipped = f" after {exc.skipped} skipped steps" if cfg.on_nan == "skip" else ""
                    raise TrainingError(
                        f"{exc}; training stopped{skipped}, {kept}. Try a lower --lr, --grad-clip 1.0 or --on-nan skip"
                    ) from None
                stop = steps.stop
                if stop is not None:
                    save_checkpoint()
                    progress.close()
                    raise TrainingInterrupted(
                        f"stopped at step {state.step}; checkpoint saved. Resume with: "
                        f"cnnlab train --resume {folder.path}",
                        128 + stop if isinstance(stop, int) else 130,
                    )
                if "lookahead" in state.extras:
                    state.extras["lookahead"].end_epoch()
                partial = data.train.position > 0  # max_steps (or fractional epochs) reached mid-epoch
                last = partial or data.train.epoch >= cfg.epochs or state.step >= total_steps
                trace(f"evaluate epoch {epoch + 1}")
                wanted = last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)
                test = evaluate_now(per_image=last and not cfg.tta) if wanted else None
                final = test if last and not cfg.tta else final
                done_epochs = epoch + data.train.position / steps_per_epoch if partial else epoch + 1
                if test:
                    reached.update(test["accuracy"], state.step, done_epochs)
                val = evaluate_now(split="val") if data.val and wanted else None
                row = _epoch_row(done_epochs, applied_lrs(state.optimizer), state.sums, test, val, data.val is not None)
                state.history.append(row)
                state.sums = type(state.sums)()
                folder.write_metrics(state.history)
                loggers.log_epoch(epoch + 1, state.step, row)
                save_checkpoint()
                progress.end_epoch(_epoch_line(row, cfg.epochs))
        progress.close()

        # --- the finish: the final evaluation (with test-time augmentation if asked), weights, summary
        if final is None:
            final = evaluate_now(per_image=True, tta=cfg.tta)
            reached.update(final["accuracy"], state.step, state.step / steps_per_epoch)
        summary = _finish(
            folder,
            runtime,
            data,
            model,
            arch,
            state,
            final,
            reached,
            clock(),
            steps_per_epoch,
            tta=cfg.tta,
            lr=cfg.lr,
            seed=cfg.seed,
            val_split=cfg.val_split,
            deterministic=cfg.deterministic,
        )
        loggers.log_summary(summary)
    return summary


def _resume(
    state: TrainState, folder: RunFolder, header: dict, lr_at, total_steps: int, data: TrainingData, say
) -> dict | None:
    """Load the checkpoint into `state`; the run's summary if the run is already finished, else None."""
    runtime = folder.runtime
    saved = folder.load_checkpoint(say)
    _check_resumable(saved, header, folder, lr_at, total_steps, data)
    folder.restore(state, saved, say)
    run = Run(folder.path)
    if state.step >= total_steps and runtime.broadcast(run.file("summary").is_file()):
        done = run.summary if runtime.is_main else None
        if done is not None and run.finished:
            say(
                f"{folder.path} is finished ({done.get('epochs', 0):g} epochs, test accuracy "
                f"{done.get('test_accuracy', float('nan')):.4f}); nothing to resume. To train longer, start a new "
                f"run from its weights: cnnlab train --init-from {folder.path} --epochs N"
            )
        return runtime.broadcast(done)
    say(f"resuming {folder.path} at epoch {data.train.epoch + 1}, step {state.step}")
    _trim_evals(folder, state.step)
    return None


def _wrap_for_training(model: nn.Module, runtime: Runtime, compile_: bool = False) -> nn.Module:
    """What the steps call: the model, in DistributedDataParallel across ranks, compiled if asked."""
    step_model = model
    if runtime.distributed:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    return cast(nn.Module, torch.compile(step_model)) if compile_ else step_model  # a compiled Module is one


def _say_setup(say, model_name: str, data: TrainingData, model: nn.Module, runtime: Runtime, folder: RunFolder):
    say(data.describe())
    say(f"  {data.mode_reason}")
    say(
        f"training {model_name} ({sum(p.numel() for p in model.parameters()):,} parameters) on {runtime.describe()}; "
        f"run folder {folder.path}"
    )
    say(
        f"  precision {runtime.precision}: {runtime.precision_reason}; "
        f"{'channels_last' if runtime.channels_last else 'NCHW'}: {runtime.channels_last_reason}"
    )
    if data.dataset.verified is False:
        say(
            "note: the dataset's bytes differ from the publisher's; it passed the structural checks and its sha256 "
            "sums are recorded in summary.json"
        )


def _epoch_line(row: dict, epochs: float) -> str:
    tested = f" | test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}" if row["test_acc"] != "" else ""
    return (
        f"epoch {row['epoch']:g}/{epochs:g}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}{tested} | "
        f"{row['seconds']:.1f}s, {row['img_per_s']:,.0f} img/s"
    )


def _finish(
    folder: RunFolder,
    runtime: Runtime,
    data: TrainingData,
    model: nn.Module,
    arch: dict,
    state: TrainState,
    final: dict,
    reached,
    wall_seconds: float,
    steps_per_epoch: int,
    *,
    tta: int,
    lr: float,
    seed: int,
    val_split: float,
    deterministic: bool,
) -> dict:
    """Write the final weights, each test image's prediction and summary.json; returns the summary."""
    assert data.preprocess is not None  # load_training_data sets it
    meta = {
        "model": arch["model"],
        "model_args": arch["model_args"],
        "classes": data.classes,
        "mean": data.mean,
        "std": data.std,
        "input_shape": list(data.shape),
        "preprocess": data.preprocess.to_dict(),
        "dataset": data.dataset.name,
        "cnnlab_version": __version__,
    }
    losses, preds = final.pop("losses"), final.pop("preds")
    if runtime.is_main:
        save_weights(model, Run(folder.path).file("weights"), meta)
        labels = data.dataset.test_labels
        if labels is not None and len(labels) == len(preds):  # streaming may have skipped unreadable images
            folder.write_predictions(losses, preds, labels)
    bad = data.bad_images(runtime)
    summary = {
        "test_accuracy": final["accuracy"],
        "test_loss": final["loss"],
        "test_top5": final.get("top5"),
        "test_tta": tta,
        "test_per_class": final["per_class"],
        "test_confusion": final["confusion"],
        "time_to_accuracy": reached.table(),
        "epochs": round(state.step / steps_per_epoch, 4),
        "steps": state.step,
        "train_seconds": sum(r["seconds"] for r in state.history),
        "wall_seconds": wall_seconds,
        "eval_seconds": round(state.notes.get("eval_seconds", 0.0), 3),
        **runtime.as_dict(),
        "augment": data.augment,
        "data_mode": data.mode,
        "data_mode_reason": data.mode_reason,
        "bad_images": {"count": len(bad), "files": bad[:1000]},
        "versions": _versions(),
        "dataset": {
            "name": data.dataset.name,
            "source": data.dataset.source,
            "verified": data.dataset.verified,
            "files": data.dataset.files,
        },
        "seed": seed,
        "run_dir": str(folder.path),
        "nan_skipped": state.nan_skipped,
        "lr": lr,
        "lr_find": state.notes.get("lr_find"),
        # every generator's seed, so that a result can be traced and replayed
        "seeds": {
            "model_init": seed,
            "python_random": seed,
            "numpy_random": seed,
            "data_order": seed + 1,
            "augmentation": seed + 2,
            "validation_split": seed if val_split else None,
        },
        "deterministic": {
            "requested": deterministic,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
        },
    }
    folder.write_json("summary", summary)
    return summary


def _step_logger(loggers: LoggerGroup, optimizer: torch.optim.Optimizer):
    """What the loop calls after each step, when a logger wants per-step points (none for csv alone): the loss and
    the learning rates the optimiser applied."""
    if not loggers.loggers:
        return None
    return lambda step, loss, lr: loggers.log_step(step, {"train_loss": loss, **applied_lrs(optimizer)})


class _Clock:
    """Wall seconds of the whole run: those before the last resume plus those of this process."""

    def __init__(self, before: float, start: float):
        self.before, self.start = before, start

    def __call__(self) -> float:
        return self.before + time.perf_counter() - self.start


class _Thresholds:
    """When each accuracy threshold was first reached: wall seconds, step and epochs (kept in checkpoints).
    `seconds_without_eval` leaves out the evaluations themselves, as the airbench paper counts its times:
    evaluating every few steps to time a run must not slow the time it reports."""

    def __init__(self, reached: dict, clock: _Clock, without_eval: Callable[[], float]):
        self.reached, self.clock, self.without_eval = reached, clock, without_eval

    def update(self, accuracy: float, step: int, epochs: float) -> None:
        for threshold in ACCURACY_THRESHOLDS:
            key = f"{threshold:.2f}"
            if accuracy >= threshold and key not in self.reached:
                self.reached[key] = {
                    "wall_seconds": round(self.clock(), 3),
                    "seconds_without_eval": round(self.without_eval(), 3),
                    "step": step,
                    "epochs": round(epochs, 4),
                    "accuracy": accuracy,
                }

    def table(self) -> dict:
        return dict(self.reached)


def _trim_evals(folder: RunFolder, step: int) -> None:
    """On resume, forget the mid-epoch evaluations after the checkpoint's step: they are made again."""
    path = Run(folder.path).file("evals")
    if folder.runtime.is_main and path.is_file():
        lines = path.read_text().splitlines()
        kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) <= step]
        folder.write("evals", ("\n".join(kept) + "\n").encode())


def _append_eval(folder: RunFolder, step: int, epochs: float, result: dict, seconds: float) -> None:
    """One row of evals.csv: a mid-epoch evaluation (--eval-every-steps)."""
    if not folder.runtime.is_main:
        return
    path = Run(folder.path).file("evals")
    previous = path.read_text() if path.is_file() else "step,epochs,wall_seconds,test_loss,test_acc\n"
    line = f"{step},{epochs:.4f},{seconds:.3f},{result['loss']:.6f},{result['accuracy']:.6f}\n"
    folder.write("evals", (previous + line).encode())


def _epoch_row(epoch: float, lrs: dict[str, float], sums, test: dict | None, val: dict | None, has_val: bool) -> dict:
    """One metrics.csv row; test (and val) columns stay empty in epochs without an evaluation. `epoch` is
    fractional for a last epoch cut short by --max-steps; `lrs` are the rates the optimiser applied last."""
    row = {
        "epoch": round(epoch, 4) if epoch % 1 else int(epoch),
        "lr": lrs["lr"],
        "train_loss": sums.loss / max(sums.seen, 1),
        "train_acc": sums.correct / max(sums.seen, 1),
        "test_loss": test["loss"] if test else "",
        "test_acc": test["accuracy"] if test else "",
        "seconds": sums.seconds,
        "img_per_s": sums.seen / max(sums.seconds, 1e-9),
    }
    if has_val:
        row["val_loss"], row["val_acc"] = (val["loss"], val["accuracy"]) if val else ("", "")
    row.update({k: v for k, v in lrs.items() if k != "lr"})
    return row
