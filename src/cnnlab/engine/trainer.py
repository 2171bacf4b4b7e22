"""`fit(config)`: the whole training run, from dataset to weights, resumable bit for bit on CPU."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import platform
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..data import InMemoryLoader, channel_stats, load_dataset, parse_augment, split_validation
from ..errors import CheckpointError, CnnlabError, ConfigError
from ..models import accepts, create_model
from ..files import file_lock, save_atomic
from .checkpoint import CheckpointManager
from .config import TrainConfig, load_config, yaml_dump
from .evaluate import autocast_for, evaluate
from .optim import build_optimizer, build_schedule
from .progress import Progress, trace
from .weights import save_weights

__all__ = ["fit", "resume_config", "TrainingError", "TrainingInterrupted", "pick_device", "pick_precision",
           "DEFAULT_AUGMENT", "RunState"]

# What `augment: auto` means: shifts and flips suit natural images and clothing; digits would change meaning.
DEFAULT_AUGMENT = {"cifar10": "crop:4:reflect,flip", "cifar100": "crop:4:reflect,flip", "fashion-mnist": "none",
                   "mnist": "none", "imagefolder": "flip"}

# Keys that fix the architecture and data: a resumed run may not change them.
_FROZEN_ON_RESUME = ("model", "model_args", "dataset", "batch_size", "seed", "train_subset", "val_split", "augment")


class TrainingError(CnnlabError):
    """Training cannot go on (a NaN loss, say); the last good checkpoint is kept."""


class TrainingInterrupted(CnnlabError):
    """Stopped by SIGINT/SIGTERM or a callback at a step boundary, after writing a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunState:
    """What callbacks see after each step; set `stop_requested` to stop at this step boundary."""
    run_dir: Path
    epoch: int = 0
    step: int = 0
    loss: float = float("nan")
    stop_requested: bool = False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
    return device


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
        if "avx512_bf16" in flags or "amx_bf16" in flags:
            return True
    except OSError:
        pass
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def _versions() -> dict:
    return {"cnnlab": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'} ({os.cpu_count()} cores)"


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


def _default_run_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.runs_root) / f"{cfg.model}-{cfg.dataset}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _rng_state(loader: InMemoryLoader) -> dict:
    """Every generator's state, as tensors and plain numbers so that the checkpoint loads with weights_only."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss],
             "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "loader": loader.state_dict()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_host_rng(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _data_fingerprint(data, train_labels: torch.Tensor, val_labels: torch.Tensor | None) -> str:
    """Identifies the exact training data: the source files' sha256 (or, for an image folder, the decoded
    pixels) and the labels after subsetting and the validation split."""
    h = hashlib.sha256(json.dumps([f["sha256"] for f in data.files]).encode())  # not the paths: copies may move
    if data.name == "imagefolder":
        h.update(data.train_images.numpy().tobytes())
    h.update(train_labels.numpy().tobytes())
    if val_labels is not None:
        h.update(val_labels.numpy().tobytes())
    return h.hexdigest()


def _write_metrics(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    save_atomic(buffer.getvalue().encode(), path)


class _SignalStop:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits 130/143."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def threading_is_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def fit(cfg: TrainConfig, *, resume: bool = False, callbacks: Sequence[Callable[[RunState], None]] = (),
        log: Callable[[str], None] = print) -> dict:
    """Train `cfg.model` on `cfg.dataset`, evaluate on the test split, write the run folder; returns the summary."""
    # --deterministic changes process-wide switches: put them back afterwards, for the next fit() in this process
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        with contextlib.ExitStack() as stack:
            return _fit(cfg, resume, callbacks, log, stack)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2], previous[3]


@contextlib.contextmanager
def _run_folder_lock(run_dir: Path):
    """One process at a time per run folder: a second `--resume` of a live run would corrupt both."""
    try:
        with file_lock(run_dir / ".lock", wait=False):
            yield
    except BlockingIOError:
        raise ConfigError(f"{run_dir} is in use by another cnnlab process; wait for it to finish or stop "
                          "it first") from None


def _fit(cfg: TrainConfig, resume: bool, callbacks: Sequence[Callable[[RunState], None]],
         log: Callable[[str], None], stack: contextlib.ExitStack) -> dict:
    cfg.validate()
    wall_start = time.perf_counter()
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    bf16 = precision == "bf16"
    channels_last = cfg.channels_last != "off"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:  # every switch PyTorch's reproducibility notes list; seeds are set below
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: set it first
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, log=log)
    train_x, train_y = data.train_images, data.train_labels
    if cfg.train_subset:
        train_x, train_y = train_x[:cfg.train_subset], train_y[:cfg.train_subset]
    val_x = val_y = None
    if cfg.val_split:
        train_x, train_y, val_x, val_y = split_validation(train_x, train_y, cfg.val_split, seed=cfg.seed)
    mean, std = channel_stats(train_x)
    augment_spec = DEFAULT_AUGMENT.get(cfg.dataset, "none") if cfg.augment == "auto" else cfg.augment
    c, h, w = data.shape
    num_classes = len(data.classes)

    torch.manual_seed(cfg.seed)  # also seeds every CUDA device
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model_args = {"num_classes": num_classes, "in_channels": c, **cfg.model_args}
    if accepts(cfg.model, "input_size"):  # nets with a flatten layer; pooled nets take any size
        model_args = {"input_size": [h, w], **model_args}
    model = create_model(cfg.model, **model_args)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    loader = InMemoryLoader(train_x, train_y, cfg.batch_size, mean=mean, std=std, shuffle=True, drop_last=True,
                            seed=cfg.seed + 1, augment=parse_augment(augment_spec), device=device,
                            channels_last=channels_last)
    if len(loader) == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(train_y)} training images; "
                          "lower --batch-size")
    eval_batch = max(cfg.batch_size, 1024)
    test_loader = InMemoryLoader(data.test_images, data.test_labels, eval_batch, mean=mean, std=std, device=device,
                                 channels_last=channels_last)
    val_loader = None if val_x is None else InMemoryLoader(val_x, val_y, eval_batch, mean=mean, std=std,
                                                           device=device, channels_last=channels_last)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    lr_at = build_schedule(cfg.schedule, cfg.lr, total_steps, steps_per_epoch=steps_per_epoch,
                           warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, warmup=cfg.warmup,
                           milestones=cfg.milestones, milestone_unit=cfg.milestone_unit, gamma=cfg.gamma)

    run_dir = Path(cfg.run_dir) if cfg.run_dir else _default_run_dir(cfg)
    checkpoints = CheckpointManager(run_dir)
    if not resume and checkpoints.exists():
        raise ConfigError(f"{run_dir} already holds a run; resume it with 'cnnlab train --resume {run_dir}' "
                          "or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    stack.enter_context(_run_folder_lock(run_dir))
    if resume:
        for path in checkpoints.remove_stale_temp_files():
            log(f"removed {path.name}, left by a write that was cut short")
    if resume and not checkpoints.exists():  # stopped before its first checkpoint: nothing to lose
        log(f"{run_dir} has no checkpoint yet; starting it from the beginning")
        resume = False
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    arch = {"model": cfg.model, "model_args": model_args}
    fingerprint = _data_fingerprint(data, train_y, val_y)

    step, history, nan_skipped = 0, [], 0
    epoch_sums = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    if resume:
        state = checkpoints.load_latest(log=log)
        lacking = [k for k in ("arch", "model", "optimizer", "step", "history", "epoch_sums", "rng") if k not in state]
        if lacking:
            raise CheckpointError(f"{run_dir}: the checkpoint lacks {', '.join(lacking)}; it was not written by this "
                                  "version of cnnlab's trainer. Start a new run")
        if state["arch"] != json.loads(json.dumps(arch)):
            raise CheckpointError(f"{run_dir}: the checkpoint holds {state['arch']}, not {arch}; "
                                  "start a new run instead of resuming")
        if state.get("data") != fingerprint:
            raise CheckpointError(f"{run_dir}: the dataset found now ({data.source}) is not the one the run was "
                                  "trained on, so the resumed run could not match; point --data-dir at the "
                                  "original copy")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, epoch_sums = state["step"], state["history"], state["epoch_sums"]
        nan_skipped = state.get("nan_skipped", 0)
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        loader.load_state_dict(state["rng"]["loader"])
        _set_host_rng(state["rng"])
        log(f"resuming {run_dir} at epoch {loader.epoch + 1}, step {step}")
    save_atomic(yaml_dump(cfg), run_dir / "config.yaml")

    def save_checkpoint() -> None:
        # An optimiser step can turn weights non-finite while its own loss was finite: never save those.
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise TrainingError(f"step {step}: the weights hold NaN or infinite values; training stopped without "
                                f"overwriting the last good checkpoint in {run_dir}. Try a lower --lr or "
                                "--grad-clip 1.0")
        checkpoints.save({"arch": arch, "data": fingerprint, "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(), "scheduler": {"step": step}, "scaler": {},
                          "step": step, "epoch": loader.epoch, "history": history, "epoch_sums": dict(epoch_sums),
                          "nan_skipped": nan_skipped, "rng": _rng_state(loader), "config": dataclasses.asdict(cfg)})

    step_model = torch.compile(model) if cfg.compile else model
    progress = Progress(cfg.progress, total_steps, steps_per_epoch, cfg.log_every)
    run_state = RunState(run_dir)
    log(f"{data.describe()}")
    log(f"training {cfg.model} ({sum(p.numel() for p in model.parameters()):,} parameters) on {_device_name(device)}"
        f", {precision}, {'channels_last' if channels_last else 'NCHW'}, {torch.get_num_threads()} threads; "
        f"run folder {run_dir}")
    if not data.verified:
        log("note: the dataset's bytes differ from the publisher's; it passed the structural checks and its "
            "sha256 sums are recorded in summary.json")

    model.train()
    with _SignalStop() as stopper, _explain_determinism_errors():
        while loader.epoch < cfg.epochs and step < total_steps:
            epoch = loader.epoch
            progress.start_epoch(epoch, cfg.epochs, step)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            tic = time.perf_counter()
            stop_reason = None
            for x, y in loader:
                lr = lr_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast_for(device, bf16):
                    logits = step_model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    grad_size = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                else:  # the L1 norms' sum is the cheapest quantity that is non-finite when any gradient is
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    grad_size = torch.stack(torch._foreach_norm(grads, 1)).sum()
                # One host sync per step covers both the loss and every gradient.
                if not bool(torch.isfinite(loss + grad_size)):
                    what = f"the loss is {loss.item()}" if not torch.isfinite(loss) else \
                        f"the loss is {loss.item():.4g} but a gradient is NaN or infinite"
                    where = f"step {step + 1} (epoch {epoch + 1})"
                    if cfg.on_nan == "skip" and nan_skipped < cfg.max_nan_skips:
                        nan_skipped += 1
                        optimizer.zero_grad(set_to_none=True)
                        log(f"{where}: {what}; update skipped ({nan_skipped} of {cfg.max_nan_skips} allowed "
                            "by --max-nan-skips)")
                    else:
                        kept = f"the last good checkpoint is kept in {run_dir}" if checkpoints.exists() else \
                            "no checkpoint had been written yet"
                        skipped = f" after {nan_skipped} skipped steps" if cfg.on_nan == "skip" else ""
                        raise TrainingError(f"{where}: {what}; training stopped{skipped}, {kept}. Try a lower "
                                            "--lr, --grad-clip 1.0 or --on-nan skip")
                else:
                    optimizer.step()
                    loss_sum += loss.detach().double() * len(y)
                    correct += (logits.detach().argmax(1) == y).sum()
                    seen += len(y)
                step += 1
                elapsed = epoch_sums["seconds"] + time.perf_counter() - tic
                if progress.mode != "none" and (progress.mode == "bar" or step % cfg.log_every == 0):
                    total_seen = epoch_sums["seen"] + seen
                    progress.update(step, (epoch_sums["loss"] + loss_sum.item()) / max(total_seen, 1),
                                    (epoch_sums["correct"] + correct.item()) / max(total_seen, 1),
                                    total_seen / elapsed)
                if callbacks:  # .item() waits for the GPU: only pay for it when someone looks
                    run_state.epoch, run_state.step, run_state.loss = epoch, step, loss.item()
                    for callback in callbacks:
                        callback(run_state)
                if stopper.signum is not None or run_state.stop_requested:
                    stop_reason = stopper.signum or "callback"
                    break
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and loader.position < steps_per_epoch:
                    _accumulate(epoch_sums, loss_sum, correct, seen, tic)
                    loss_sum.zero_(), correct.zero_()
                    seen, tic = 0, time.perf_counter()
                    save_checkpoint()
                if step >= total_steps and loader.position < steps_per_epoch:
                    break  # max_steps reached mid-epoch
            _accumulate(epoch_sums, loss_sum, correct, seen, tic)
            if stop_reason is not None or loader.position:  # stopped mid-epoch
                save_checkpoint()
                progress.close()
                if stop_reason is None:  # max_steps reached mid-epoch
                    break
                code = 128 + stop_reason if isinstance(stop_reason, int) else 130
                raise TrainingInterrupted(f"stopped at step {step}; checkpoint saved. Resume with: "
                                          f"cnnlab train --resume {run_dir}", code)
            trace(f"evaluate epoch {epoch + 1}")
            evaluate_now = cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)
            row = _epoch_row(epoch, lr_at(max(step - 1, 0)), epoch_sums, model, test_loader, val_loader,
                             num_classes, bf16, bool(evaluate_now))
            history.append(row)
            epoch_sums = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            _write_metrics(run_dir / "metrics.csv", history)
            save_checkpoint()
            tested = f" | test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}" if evaluate_now else ""
            progress.end_epoch(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc "
                               f"{row['train_acc']:.4f}{tested} | {row['seconds']:.1f}s, {row['img_per_s']:,.0f} img/s")
    progress.close()

    final = evaluate(model, test_loader, num_classes, bf16=bf16)
    meta = {"model": cfg.model, "model_args": model_args, "classes": data.classes, "mean": mean, "std": std,
            "input_shape": [c, h, w], "dataset": cfg.dataset, "cnnlab_version": __version__}
    save_weights(model, run_dir / "model.safetensors", meta)
    summary = {
        "test_accuracy": final["accuracy"], "test_loss": final["loss"], "test_top5": final.get("top5"),
        "epochs": loader.epoch, "steps": step,
        "train_seconds": sum(r["seconds"] for r in history), "wall_seconds": time.perf_counter() - wall_start,
        "device": _device_name(device), "precision": precision, "channels_last": channels_last,
        "threads": torch.get_num_threads(), "augment": augment_spec, "versions": _versions(),
        "dataset": {"name": data.name, "source": data.source, "verified": data.verified, "files": data.files},
        "seed": cfg.seed, "run_dir": str(run_dir), "nan_skipped": nan_skipped,
        # every generator's seed, so that a result can be traced and replayed
        "seeds": {"model_init": cfg.seed, "python_random": cfg.seed, "numpy_random": cfg.seed, "data_order": cfg.seed + 1,
                  "augmentation": cfg.seed + 2, "validation_split": cfg.seed if cfg.val_split else None},
        "deterministic": {"requested": cfg.deterministic,
                          "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                          "cudnn_benchmark": torch.backends.cudnn.benchmark,
                          "cudnn_deterministic": torch.backends.cudnn.deterministic},
    }
    save_atomic(json.dumps(summary, indent=2).encode(), run_dir / "summary.json")
    return summary


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


def _accumulate(sums: dict, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, tic: float) -> None:
    sums["loss"] += loss_sum.item()
    sums["correct"] += int(correct.item())
    sums["seen"] += seen
    sums["seconds"] += time.perf_counter() - tic


def _epoch_row(epoch, lr, sums, model, test_loader, val_loader, num_classes, bf16, evaluate_now: bool) -> dict:
    """One metrics.csv row; test (and val) columns stay empty in epochs without an evaluation."""
    def scores(loader) -> dict:
        return evaluate(model, loader, num_classes, bf16=bf16) if evaluate_now else {"loss": "", "accuracy": ""}
    test = scores(test_loader)
    row = {"epoch": epoch + 1, "lr": lr, "train_loss": sums["loss"] / max(sums["seen"], 1),
           "train_acc": sums["correct"] / max(sums["seen"], 1), "test_loss": test["loss"],
           "test_acc": test["accuracy"], "seconds": sums["seconds"],
           "img_per_s": sums["seen"] / max(sums["seconds"], 1e-9)}
    if val_loader is not None:
        val = scores(val_loader)
        row["val_loss"], row["val_acc"] = val["loss"], val["accuracy"]
    return row
