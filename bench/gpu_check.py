"""One prepared check of cnnlab on a lent CUDA GPU, through cnnlab's own API and command line, on synthetic data
made on the spot (the machine holds no datasets): device and precision picks, channels_last, the dataset held
on the GPU, resume, --deterministic, DDP over NCCL, torch.compile, and training throughput against a plain
fp32 eager PyTorch loop run in the same process.

    python bench/gpu_check.py OUT_DIR          # or with $OUT set; writes OUT_DIR/gpu_check.json
    python bench/gpu_check.py --cpu-smoke DIR  # the device-agnostic parts on this CPU, in about a minute

Each check prints one line (PASS, FAIL or SKIP, seconds, figures) and runs in its own try/except; a global
time budget (--budget, default 240 s) skips the checks that would not fit, and says so.
Exit codes: 0 every check that ran passed; 1 a check failed; 2 bad arguments; 3 no CUDA device, nothing checked
(--cpu-smoke still runs the device-agnostic parts).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
sys.path.insert(0, str(SRC))

try:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    import cnnlab
    from cnnlab import TrainConfig, create_model, fit
    from cnnlab.data import channel_stats, load_dataset
    from cnnlab.files import save_atomic
    from cnnlab.models import accepts
    from cnnlab.training.runtime import device_name, start_runtime
    from cnnlab.training.trainer import TrainingInterrupted, load_training_data, resume_config
except ImportError as exc:  # a fresh GPU machine may lack cnnlab's dependencies: say which, not a traceback
    print(
        f"gpu_check: cannot import {exc.name or exc}: install cnnlab's dependencies first "
        f"(pip install -e {REPO}; torch itself must be a CUDA build)",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3
DEFAULT_BUDGET_S = 240
# airbench94.py on one A100: 3.83 s for its whole ~9.9-epoch run (Jordan 2024, arXiv 2404.00498)
AIRBENCH_PAPER_S_PER_EPOCH = 3.83 / 9.9


# ---------------------------------------------------------------------------------------------- the harness


class CheckFailed(Exception):
    """A check ran and found something wrong; `figures` are what it measured up to then."""

    def __init__(self, message: str, **figures):
        super().__init__(message)
        self.figures = figures


@dataclass
class Sizes:
    """How much work each check does: the real sizes on a GPU, small ones for --cpu-smoke."""

    small_model: str  # the net of the functional checks
    small_args: dict
    quick_images: int  # training images of the functional checks' runs
    resume_images: int
    resume_stop_step: int  # mid-epoch: batch 128 (64 on CPU) makes 16 (8) steps per epoch
    batch: int
    throughput: list  # (model, model_args, dataset, images per epoch, batch, repeats)
    ddp_images: int


GPU_SIZES = Sizes(
    small_model="convnet",
    small_args={},
    quick_images=4096,
    resume_images=2048,
    resume_stop_step=12,
    batch=128,
    throughput=[
        ("convnet", {}, "synthetic-cifar", 6_400, 128, 3),
        ("resnet20", {}, "synthetic-cifar", 6_400, 128, 3),
        ("resnet50", {}, "synthetic-imagenet", 3_840, 128, 2),
    ],
    ddp_images=8192,
)
# On a CPU the checks only have to run: a tiny net, a few hundred images, one repeat.
SMOKE_SIZES = Sizes(
    small_model="cnn",
    small_args={"spec": "c8,p,c16,p,f32"},
    quick_images=512,
    resume_images=512,
    resume_stop_step=6,
    batch=64,
    throughput=[("cnn", {"spec": "c8,p,c16,p,f32"}, "synthetic-cifar", 512, 64, 1)],
    ddp_images=512,
)


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL or SKIP
    seconds: float
    summary: str
    figures: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class Context:
    """What every check shares: where to compute and write, the sizes, the clock, and earlier checks' figures."""

    cuda: bool
    sizes: Sizes
    work: Path  # run folders (deleted at the end; $OUT gets only the JSON)
    env: dict  # for subprocesses: cnnlab's sources first on the path, a private cache
    deadline: float
    figures: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "auto" if self.cuda else "cpu"

    @property
    def auto_or_fp32(self) -> dict:
        # On the CPU the automatic choice costs a timing probe; the smoke run does not need it
        return (
            {"precision": "auto", "channels_last": "auto"}
            if self.cuda
            else {"precision": "fp32", "channels_last": "off"}
        )

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def run_dir(self, name: str) -> Path:
        return self.work / name

    def config(self, name: str, **overrides) -> TrainConfig:
        s = self.sizes
        values = dict(
            model=s.small_model,
            model_args=dict(s.small_args),
            dataset="synthetic-cifar",
            train_subset=s.quick_images,
            batch_size=s.batch,
            epochs=2,
            device=self.device,
            progress="none",
            report=False,
            run_dir=str(self.run_dir(name)),
            threads=0 if self.cuda else 2,
            **self.auto_or_fp32,
        )
        values.update(overrides)
        return TrainConfig(**values)

    def cli_args(self, cfg: TrainConfig) -> list[str]:
        """`cnnlab train` flags for `cfg` (the fields the checks set)."""
        args = [
            "-m",
            "cnnlab",
            "train",
            "--model",
            cfg.model,
            "--dataset",
            cfg.dataset,
            "--train-subset",
            str(cfg.train_subset),
            "--batch-size",
            str(cfg.batch_size),
            "--epochs",
            str(cfg.epochs),
            "--device",
            cfg.device,
            "--precision",
            cfg.precision,
            "--channels-last",
            cfg.channels_last,
            "--progress",
            "none",
            "--eval-every",
            str(cfg.eval_every),
            "--run-dir",
            str(cfg.run_dir),
            "--no-report",
        ]
        for key, value in cfg.model_args.items():
            args += ["--model-arg", f"{key}={value}"]
        return args + (["--threads", str(cfg.threads)] if cfg.threads else [])


def quiet(message: str) -> None:
    pass


def run_processes(ctx: Context, commands: list[list[str]], what: str) -> list[subprocess.CompletedProcess]:
    """Run commands side by side (python subprocesses in the work folder); a hang is killed at the deadline."""
    procs = [
        subprocess.Popen(
            [sys.executable, *cmd],
            cwd=ctx.work,
            env=ctx.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for cmd in commands
    ]
    done = []
    for cmd, proc in zip(commands, procs):
        try:
            out, err = proc.communicate(timeout=max(ctx.time_left(), 30))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)  # its own session: torchrun's workers go with it
            for p in procs:
                p.communicate()
            raise CheckFailed(f"{what}: still running at the time budget's end; killed") from None
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def epoch_row(run_dir: Path, epoch: int = 2) -> dict:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    row = next((r for r in rows if float(r["epoch"]) == epoch), None)
    if row is None:
        raise CheckFailed(f"{run_dir / 'metrics.csv'} has no row for epoch {epoch}")
    return {k: float(v) if v not in ("", None) else None for k, v in row.items()}


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def weights_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model.safetensors")


def weight_distance(a: dict, b: dict) -> tuple[bool, float]:
    """(bitwise equal, relative L2 distance over all floating-point tensors)."""
    if a.keys() != b.keys():
        raise CheckFailed(f"the runs saved different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    equal = all(torch.equal(a[k], b[k]) for k in a)
    floats = [k for k in a if a[k].is_floating_point()]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in floats) ** 0.5
    norm = sum(float(a[k].double().pow(2).sum()) for k in floats) ** 0.5
    return equal, diff / max(norm, 1e-30)


def free_gpu() -> None:
    """Drop what finished runs left behind (loaders hold whole datasets on the device) before the next measures."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- conditions


def conditions(cuda: bool) -> dict:
    info = {
        "torch": torch.__version__,
        "cnnlab": cnnlab.__version__,
        "python": platform.python_version(),
        "cpu": device_name(torch.device("cpu")),
        "torch_cuda_build": torch.version.cuda,
    }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        info["commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None  # a copy without .git
    if cuda:
        info["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(i)),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
        info["cudnn"] = torch.backends.cudnn.version()
        info["nccl"] = nccl_version()
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        # what the plain fp32 baseline computes in: PyTorch's defaults, left as they are
        info["tf32"] = {"cudnn_conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return info


def nccl_version() -> str | None:
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001  a build without NCCL
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def describe_conditions(info: dict) -> str:
    if "gpus" in info:
        gpus = info["gpus"]
        where = (
            f"{gpus[0]['name']} x{len(gpus)} ({gpus[0]['capability']}, {gpus[0]['memory_gib']} GiB), "
            f"CUDA {info['torch_cuda_build']}, cuDNN {info['cudnn']}, NCCL {info['nccl']}, TF32 conv "
            f"{info['tf32']['cudnn_conv']} / matmul {info['tf32']['matmul']}, cudnn.benchmark "
            f"{info['cudnn_benchmark']}"
        )
    else:
        where = "CPU only (smoke run)"
    return (
        f"{where}; torch {info['torch']}, cnnlab {info['cnnlab']} ({info['commit'] or 'no git'}), python "
        f"{info['python']}; host CPU {info['cpu']}"
    )


# ---------------------------------------------------------------------------------------------- the checks


def check_auto_settings(ctx: Context) -> tuple[str, dict]:
    """device auto picks CUDA, precision auto picks bf16 where the GPU has it, channels_last auto is on; the model
    trains on the GPU in that layout and learns the synthetic classes."""
    seen = {}

    def look(state):
        if state.step == 1:
            convs = [m.weight for m in state.model.modules() if isinstance(m, torch.nn.Conv2d)]
            seen["param_device"] = str(next(state.model.parameters()).device)
            seen["conv_weights_channels_last"] = all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)

    summary = fit(
        ctx.config("auto", device="auto", precision="auto", channels_last="auto"), callbacks=[look], log=quiet
    )
    gpu = torch.cuda.get_device_name(0)
    want_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    figures = {
        "device": summary["device"],
        "precision": summary["precision"],
        "precision_reason": summary["precision_reason"],
        "channels_last": summary["channels_last"],
        "channels_last_reason": summary["channels_last_reason"],
        "test_accuracy": summary["test_accuracy"],
        **seen,
    }
    problems = []
    if summary["device"] != gpu or not seen.get("param_device", "").startswith("cuda"):
        problems.append(f"device {summary['device']} (parameters on {seen.get('param_device')}), expected {gpu}")
    if summary["precision"] != want_precision or not summary["precision_reason"]:
        problems.append(
            f"precision {summary['precision']} ({summary['precision_reason']!r}), expected {want_precision}"
        )
    if not summary["channels_last"] or not seen.get("conv_weights_channels_last"):
        problems.append("channels_last not in effect")
    if summary["test_accuracy"] < 0.5:
        problems.append(f"test accuracy {summary['test_accuracy']:.3f} on 10 separable synthetic classes")
    if problems:
        raise CheckFailed("; ".join(problems), **figures)
    return (
        f"{summary['device']}, {summary['precision']} ({summary['precision_reason']}), channels_last "
        f"({summary['channels_last_reason']}), test acc {summary['test_accuracy']:.3f}"
    ), figures


def check_data_on_device(ctx: Context) -> tuple[str, dict]:
    """InMemoryLoader moves the whole uint8 dataset to the training device once; batches come out there."""
    cfg = ctx.config("data")
    before = torch.cuda.memory_allocated() if ctx.cuda else 0
    with start_runtime(cfg.device, cfg.precision, cfg.channels_last, cfg.threads) as runtime:
        data = load_training_data(cfg, runtime, log=quiet)
        x, y = next(iter(data.train))
        figures = {
            "device": str(runtime.device),
            "train_images_device": str(data.train.images.device),
            "train_images_dtype": str(data.train.images.dtype),
            "train_images_shape": list(data.train.images.shape),
            "train_labels_device": str(data.train.labels.device),
            "test_images_device": str(data.test.images.device),
            "batch_device": str(x.device),
            "batch_dtype": str(x.dtype),
            "labels_device": str(y.device),
            "batch_channels_last": x.is_contiguous(memory_format=torch.channels_last),
            "runtime_channels_last": runtime.channels_last,
            "dataset_mib_on_device": round((data.train.images.nbytes + data.test.images.nbytes) / 2**20, 1),
        }
        if ctx.cuda:
            figures["cuda_allocated_mib"] = round((torch.cuda.memory_allocated() - before) / 2**20, 1)
        want = runtime.device.type
    where = [
        figures[k]
        for k in ("train_images_device", "train_labels_device", "test_images_device", "batch_device", "labels_device")
    ]
    problems = [f"tensors on {where}, expected all on {want}"] if any(not d.startswith(want) for d in where) else []
    if figures["train_images_dtype"] != "torch.uint8":
        problems.append(f"the stored images are {figures['train_images_dtype']}, not uint8")
    if figures["batch_dtype"] != "torch.float32":
        problems.append(f"batches are {figures['batch_dtype']}, expected float32 (autocast casts later)")
    if figures["runtime_channels_last"] and not figures["batch_channels_last"]:
        problems.append("the runtime chose channels_last but the batches are not")
    if problems:
        raise CheckFailed("; ".join(problems), **figures)
    return (
        f"uint8 dataset {figures['train_images_shape']} ({figures['dataset_mib_on_device']} MiB with the test "
        f"split) on {figures['train_images_device']}; batches {figures['batch_dtype']} on "
        f"{figures['batch_device']}, channels_last {figures['batch_channels_last']}"
    ), figures


def check_resume(ctx: Context) -> tuple[str, dict]:
    """Stop mid-epoch with a callback, resume from the checkpoint, compare with an uninterrupted run: bitwise on
    CPU; on CUDA within the run-to-run spread of two uninterrupted runs (bitwise is not promised there)."""
    stop = ctx.sizes.resume_stop_step

    def stop_at(state):
        if state.step == stop:
            state.stop_requested = True

    cfg = {"train_subset": ctx.sizes.resume_images, "eval_every": 0}
    fit(ctx.config("resume-a", **cfg), log=quiet)
    try:
        fit(ctx.config("resume-c", **cfg), callbacks=[stop_at], log=quiet)
        raise CheckFailed(f"the callback asked to stop at step {stop}, but the run finished")
    except TrainingInterrupted:
        pass
    resumed = fit(resume_config(ctx.run_dir("resume-c")), resume=True, log=quiet)
    a, c = weights_of(ctx.run_dir("resume-a")), weights_of(ctx.run_dir("resume-c"))
    equal, distance = weight_distance(a, c)
    uninterrupted = summary_of(ctx.run_dir("resume-a"))
    figures = {
        "stopped_at_step": stop,
        "steps": resumed["steps"],
        "bitwise_equal": equal,
        "relative_l2_resumed_vs_uninterrupted": distance,
        "test_accuracy": [uninterrupted["test_accuracy"], resumed["test_accuracy"]],
    }
    if resumed["steps"] != uninterrupted["steps"]:
        raise CheckFailed(
            f"the resumed run took {resumed['steps']} steps, the uninterrupted one {uninterrupted['steps']}", **figures
        )
    if not ctx.cuda:
        if not equal:
            raise CheckFailed(
                f"on CPU a resumed run must be bitwise equal; relative L2 distance {distance:.2e}", **figures
            )
        return f"stopped at step {stop}, resumed: weights bitwise equal to the uninterrupted run's", figures
    # CUDA: some cuDNN kernels sum in a varying order, so measure how far two uninterrupted runs drift apart
    fit(ctx.config("resume-b", **cfg), log=quiet)
    _, spread = weight_distance(a, weights_of(ctx.run_dir("resume-b")))
    tolerance = max(5 * spread, 2e-3)
    figures.update(relative_l2_two_uninterrupted=spread, tolerance=tolerance)
    if distance > tolerance:
        raise CheckFailed(
            f"resumed run differs by {distance:.2e} (relative L2), more than {tolerance:.1e} (5x the "
            f"{spread:.2e} between two uninterrupted runs, at least 2e-3)",
            **figures,
        )
    return (
        f"stopped at step {stop}, resumed: relative L2 {distance:.2e} from the uninterrupted run (two "
        f"uninterrupted runs: {spread:.2e}; bitwise equal: {equal}), test acc {resumed['test_accuracy']:.3f}"
    ), figures


_REFUSAL = re.compile(r"--deterministic cannot be honoured here: (.*)")


def check_deterministic(ctx: Context) -> tuple[str, dict]:
    """`cnnlab train --deterministic` twice in fresh processes (cuBLAS reads its workspace setting at start-up):
    bitwise-equal weights, or a clear refusal naming the op (a TrainingError, exit code 2). airbench94's global
    max pool has no deterministic CUDA backward, so on a GPU it shows the refusal path."""
    models = [(ctx.sizes.small_model, ctx.sizes.small_args)]
    if ctx.cuda:
        models.append(("airbench94", {}))
    base = {"train_subset": ctx.sizes.quick_images // 2, "epochs": 1, "deterministic": True}
    configs = {
        (m, run): ctx.config(f"det-{m}-{run}", model=m, model_args=args, **base) for m, args in models for run in "ab"
    }
    # the first run of every model side by side; a second run only where the first trained
    firsts = run_processes(
        ctx, [ctx.cli_args(configs[(m, "a")]) + ["--deterministic"] for m, _ in models], "--deterministic runs"
    )
    figures, lines, failures = {}, [], []
    for (model, _), first in zip(models, firsts):
        refusal = _REFUSAL.search(first.stderr)
        if first.returncode == 2 and refusal:
            op = re.search(r"(\w+) does not have a deterministic implementation", refusal.group(1))
            figures[model] = {"outcome": "refused", "op": op.group(1) if op else None, "message": refusal.group(0)}
            lines.append(f"{model}: refused ({op.group(1) if op else refusal.group(1)[:80]})")
            if not op:
                failures.append(f"{model}: the refusal does not name the op: {refusal.group(0)[:200]}")
            continue
        if first.returncode != 0:
            figures[model] = {"outcome": "crashed", "exit_code": first.returncode, "stderr": last_line(first.stderr)}
            failures.append(f"{model}: exit code {first.returncode}: {last_line(first.stderr)}")
            continue
        second = run_processes(ctx, [ctx.cli_args(configs[(model, "b")]) + ["--deterministic"]], model)[0]
        if second.returncode != 0:
            failures.append(f"{model}: the second run failed: {last_line(second.stderr)}")
            continue
        equal, distance = weight_distance(
            weights_of(Path(configs[(model, "a")].run_dir)), weights_of(Path(configs[(model, "b")].run_dir))
        )
        summary = summary_of(Path(configs[(model, "a")].run_dir))
        figures[model] = {
            "outcome": "bitwise equal" if equal else "different",
            "relative_l2": distance,
            "deterministic": summary["deterministic"],
        }
        lines.append(f"{model}: {'bitwise equal' if equal else f'DIFFERENT (relative L2 {distance:.2e})'}")
        if not equal:
            failures.append(f"{model}: two --deterministic runs differ (relative L2 {distance:.2e})")
    if failures:
        raise CheckFailed("; ".join(failures), **figures)
    return "; ".join(lines), figures


def check_ddp(ctx: Context) -> tuple[str, dict]:
    """`cnnlab train --nproc-per-node N` (torchrun --standalone; NCCL) on the N GPUs present. With one GPU, a
    one-process torchrun run of cnnlab and a one-rank NCCL all-reduce exercise the launcher and NCCL's start-up."""
    gpus = torch.cuda.device_count()
    cfg = ctx.config("ddp", model="resnet20", train_subset=ctx.sizes.ddp_images, batch_size=128 * gpus, eval_every=0)
    launch = ctx.cli_args(cfg) + ["--nproc-per-node", str(gpus)]
    commands = [launch]
    if gpus == 1:  # cnnlab opens no process group for one rank: exercise NCCL's start-up directly
        commands.append(
            [
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "1",
                str(Path(__file__).resolve()),
                "--nccl-worker",
                str(ctx.work / "nccl.json"),
            ]
        )
    results = run_processes(ctx, commands, "torchrun")
    for result in results:
        if result.returncode != 0:
            raise CheckFailed(
                f"{' '.join(result.args[:6])} ...: exit code {result.returncode}: {last_line(result.stderr)}"
            )
    summary, row = summary_of(Path(cfg.run_dir)), epoch_row(Path(cfg.run_dir))
    figures = {
        "gpus": gpus,
        "world_size": summary["world_size"],
        "backend": summary["backend"],
        "device": summary["device"],
        "test_accuracy": summary["test_accuracy"],
        "img_per_s": row["img_per_s"],
        "global_batch": cfg.batch_size,
    }
    if summary["world_size"] != gpus or (gpus > 1 and summary["backend"] != "nccl"):
        raise CheckFailed(
            f"world size {summary['world_size']}, backend {summary['backend']}; expected {gpus} processes on NCCL",
            **figures,
        )
    if gpus == 1:
        nccl = json.loads((ctx.work / "nccl.json").read_text())
        figures["nccl_single_rank"] = nccl
        if nccl["all_reduce"] != nccl["expected"]:
            raise CheckFailed(f"NCCL all-reduce gave {nccl['all_reduce']}, expected {nccl['expected']}", **figures)
        return (
            f"1 GPU: multi-GPU DDP not checked (needs 2+); torchrun ran cnnlab on {summary['device']} "
            f"({row['img_per_s']:,.0f} img/s), NCCL {nccl['nccl']} started and all-reduced on 1 rank"
        ), figures
    # the same run in one process, for the scaling figure
    single = fit(
        ctx.config(
            "ddp-single", model="resnet20", train_subset=ctx.sizes.ddp_images, batch_size=128 * gpus, eval_every=0
        ),
        log=quiet,
    )
    single_rate = epoch_row(Path(single["run_dir"]))["img_per_s"]
    figures.update(single_gpu_img_per_s=single_rate, speedup=row["img_per_s"] / single_rate)
    return (
        f"{gpus} ranks on NCCL: {row['img_per_s']:,.0f} img/s vs {single_rate:,.0f} on 1 GPU = "
        f"{row['img_per_s'] / single_rate:.2f}x (resnet20, global batch {cfg.batch_size}), test acc "
        f"{summary['test_accuracy']:.3f}"
    ), figures


def plain_rate(
    model_name: str,
    model_args: dict,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    batch: int,
    steps: int,
    warmup: int,
    *,
    bf16: bool = False,
    channels_last: bool = False,
) -> float:
    """img/s of a hand-written training loop over normalised float tensors already on the device: SGD with
    Nesterov momentum, label-smoothed cross-entropy, no host sync inside the timed steps."""
    device = x.device
    c, h, w = x.shape[1:]
    args = {"num_classes": num_classes, "in_channels": c, **model_args}
    if accepts(model_name, "input_size"):
        args["input_size"] = [h, w]
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(model_name, **args).to(device, memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).to(device)
    per_epoch = len(y) // batch

    def step(i: int) -> None:
        idx = order[(i % per_epoch) * batch : (i % per_epoch + 1) * batch]
        xb = x.index_select(0, idx).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), y.index_select(0, idx), label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    sync()
    return steps * batch / (time.perf_counter() - start)


def normalised(dataset: str, images: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first `images` training images of a (synthetic) dataset as normalised float32 NCHW on `device`."""
    data = load_dataset(dataset, log=quiet)
    x8, y = data.train_images[:images], data.train_labels[:images]
    mean, std = channel_stats(x8)
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    x = torch.cat([((chunk.float() / 255 - mean_t) / std_t).to(device) for chunk in x8.split(1024)])
    return x, y.to(device), len(data.classes)


def throughput(
    ctx: Context, model: str, model_args: dict, dataset: str, images: int, batch: int, repeats: int
) -> tuple[str, dict]:
    """Training img/s of `cnnlab.fit` (its own settings; the second epoch, after warm-up) against the plain loop in
    fp32 NCHW eager, and the plain loop with cnnlab's precision and layout; interleaved over the repeats."""
    steps = images // batch
    device = torch.device("cuda" if ctx.cuda else "cpu")
    x, y, num_classes = normalised(dataset, images, device)
    rates: dict[str, list[float]] = {"cnnlab": [], "plain_fp32": [], "plain_same_settings": []}
    settings = None
    for r in range(repeats):
        cfg = ctx.config(
            f"throughput-{model}-{r}",
            model=model,
            model_args=dict(model_args),
            dataset=dataset,
            train_subset=images,
            batch_size=batch,
            eval_every=0,
        )
        summary = fit(cfg, log=quiet)
        row = epoch_row(Path(cfg.run_dir))
        if not row["train_loss"] or row["train_loss"] != row["train_loss"]:
            raise CheckFailed(f"{model}: training loss {row['train_loss']}", **rates)
        rates["cnnlab"].append(row["img_per_s"])
        settings = (summary["precision"] == "bf16", bool(summary["channels_last"]))
        free_gpu()
        rates["plain_fp32"].append(plain_rate(model, model_args, x, y, num_classes, batch, steps, min(10, steps)))
        if settings == (False, False):  # cnnlab chose fp32 NCHW: the same loop again would measure nothing new
            rates["plain_same_settings"].append(rates["plain_fp32"][-1])
        else:
            rates["plain_same_settings"].append(
                plain_rate(
                    model,
                    model_args,
                    x,
                    y,
                    num_classes,
                    batch,
                    steps,
                    min(10, steps),
                    bf16=settings[0],
                    channels_last=settings[1],
                )
            )
        free_gpu()
    med = {k: statistics.median(v) for k, v in rates.items()}
    figures = {
        "model": model,
        "dataset": dataset,
        "input": "x".join(map(str, x.shape[1:])),
        "batch": batch,
        "images_per_epoch": steps * batch,
        "repeats": repeats,
        "img_per_s": rates,
        "min": {k: min(v) for k, v in rates.items()},
        "median": med,
        "cnnlab_settings": {"bf16": settings[0], "channels_last": settings[1]},
        "ratio_cnnlab_vs_plain_fp32": med["cnnlab"] / med["plain_fp32"],
        "ratio_cnnlab_vs_plain_same_settings": med["cnnlab"] / med["plain_same_settings"],
    }
    ctx.figures[f"throughput_{model}"] = figures
    label = f"{'bf16' if settings[0] else 'fp32'}{' channels_last' if settings[1] else ''}"
    line = (
        f"{model} {figures['input']} batch {batch}: cnnlab {med['cnnlab']:,.0f} img/s ({label}), plain fp32 "
        f"{med['plain_fp32']:,.0f}"
    )
    if settings != (False, False):
        line += f", plain {label} {med['plain_same_settings']:,.0f}"
    line += f"; cnnlab / plain fp32 = {figures['ratio_cnnlab_vs_plain_fp32']:.2f}x"
    if settings != (False, False):
        line += f", / plain {label} = {figures['ratio_cnnlab_vs_plain_same_settings']:.2f}x"
    return line + f" (medians of {repeats})", figures


def check_compile(ctx: Context) -> tuple[str, dict]:
    """`cnnlab train --compile` (torch.compile of the training model) in a fresh process: it trains, and its
    second epoch's img/s against the eager figure of the convnet throughput check."""
    cfg = ctx.config("compile", model="convnet", model_args={}, train_subset=6_400, eval_every=0)
    result = run_processes(ctx, [ctx.cli_args(cfg) + ["--compile"]], "--compile")[0]
    if result.returncode != 0:
        raise CheckFailed(f"exit code {result.returncode}: {last_line(result.stderr)}")
    rows = [epoch_row(Path(cfg.run_dir), e) for e in (1, 2)]
    summary = summary_of(Path(cfg.run_dir))
    figures = {
        "epoch1_seconds": rows[0]["seconds"],
        "img_per_s": rows[1]["img_per_s"],
        "test_accuracy": summary["test_accuracy"],
    }
    eager = ctx.figures.get("throughput_convnet", {}).get("median", {}).get("cnnlab")
    versus = "no eager figure (the throughput check did not run)"
    if eager:
        figures.update(eager_img_per_s=eager, ratio_compiled_vs_eager=rows[1]["img_per_s"] / eager)
        versus = f"eager {eager:,.0f} img/s: {rows[1]['img_per_s'] / eager:.2f}x"
    if summary["test_accuracy"] < 0.5:
        raise CheckFailed(f"test accuracy {summary['test_accuracy']:.3f} after a compiled run", **figures)
    return (
        f"convnet compiled: epoch 1 {rows[0]['seconds']:.1f} s (compiling), epoch 2 {rows[1]['img_per_s']:,.0f} "
        f"img/s vs {versus}; test acc {summary['test_accuracy']:.3f}"
    ), figures


def check_airbench(ctx: Context) -> tuple[str, dict]:
    """airbench94's time per epoch on 50,000 CIFAR-shaped images at batch 1024 (48 steps), cnnlab.fit's second
    epoch against the plain fp32 loop; the paper's whole run is 3.83 s for ~9.9 epochs on an A100."""
    batch, images = 1024, 50_000
    steps = images // batch
    cfg, how = airbench_config(ctx, images, batch)
    fit(cfg, log=quiet)
    row = epoch_row(Path(cfg.run_dir))
    free_gpu()
    x, y, num_classes = normalised("synthetic-cifar", images, torch.device("cuda"))
    plain = plain_rate("airbench94", {}, x, y, num_classes, batch, steps, 5)
    plain_seconds = steps * batch / plain
    figures = {
        "seconds_per_epoch": row["seconds"],
        "img_per_s": row["img_per_s"],
        "steps_per_epoch": steps,
        "config": how,
        "plain_fp32_seconds_per_epoch": plain_seconds,
        "ratio_plain_vs_cnnlab_seconds": plain_seconds / row["seconds"],
        "paper_a100_seconds_per_epoch": AIRBENCH_PAPER_S_PER_EPOCH,
    }
    return (
        f"airbench94 ({how}): {row['seconds']:.2f} s per epoch of {steps} steps x {batch} "
        f"({row['img_per_s']:,.0f} img/s); plain fp32 loop {plain_seconds:.2f} s; paper "
        f"~{AIRBENCH_PAPER_S_PER_EPOCH:.2f} s/epoch (3.83 s / 9.9 epochs, A100, whole run)"
    ), figures


def airbench_config(ctx: Context, images: int, batch: int) -> tuple[TrainConfig, str]:
    """airbench94 for 2 epochs on synthetic CIFAR: with the paper's recipe where this cnnlab has it (its
    optimiser, schedule, augmentation and parameter groups), else with cnnlab's defaults."""
    cfg = ctx.config("airbench", model="airbench94", model_args={}, train_subset=images, batch_size=batch, eval_every=0)
    from cnnlab.training.recipes import RECIPES, apply_recipe

    if "airbench94" not in RECIPES:
        return cfg, "cnnlab's default optimiser and schedule"
    keep = {
        k: getattr(cfg, k)
        for k in (
            "dataset",
            "data_dir",
            "train_subset",
            "batch_size",
            "eval_every",
            "run_dir",
            "device",
            "precision",
            "channels_last",
            "progress",
            "report",
            "threads",
        )
    }
    return dataclasses.replace(apply_recipe(cfg, "airbench94"), epochs=2, **keep), "the airbench94 recipe"


@dataclass
class Check:
    name: str
    run: Callable[[Context], tuple[str, dict]]
    estimate_s: float  # on an H200; a check starts only if this much of the budget is left
    cuda_only: bool = False


def checks_for(ctx: Context) -> list[Check]:
    """In order of importance: what must work first, then what is measured."""
    s = ctx.sizes
    out = [
        Check("auto-settings", check_auto_settings, 15, cuda_only=True),
        Check("data-on-device", check_data_on_device, 5),
        Check("resume", check_resume, 20),
        Check("deterministic", check_deterministic, 30),
        Check("ddp-nccl", check_ddp, 30, cuda_only=True),
    ]
    for model, args, dataset, images, batch, repeats in s.throughput:
        estimate = 40 if dataset == "synthetic-imagenet" else 15

        def run(c, model=model, args=args, dataset=dataset, images=images, batch=batch, repeats=repeats):
            return throughput(c, model, args, dataset, images, batch, repeats)

        out.append(Check(f"throughput-{model}", run, estimate))
    if not ctx.cuda:  # the GPU list's models, reported as skipped so that the smoke run shows the whole plan
        out += [
            Check(f"throughput-{m}", lambda c: ("", {}), 0, cuda_only=True)
            for m, *_ in GPU_SIZES.throughput
            if m not in {t[0] for t in s.throughput}
        ]
    out += [
        Check("compile", check_compile, 60, cuda_only=True),
        Check("airbench94-epoch", check_airbench, 20, cuda_only=True),
    ]
    return out


def run_check(ctx: Context, check: Check) -> Result:
    if check.cuda_only and not ctx.cuda:
        return Result(check.name, "SKIP", 0.0, "needs a CUDA device (smoke run)")
    if ctx.time_left() < check.estimate_s:
        return Result(
            check.name,
            "SKIP",
            0.0,
            f"time budget: {max(ctx.time_left(), 0):.0f} s left, the check "
            f"needs about {check.estimate_s:.0f} s (raise --budget)",
        )
    start = time.monotonic()
    try:
        summary, figures = check.run(ctx)
        return Result(check.name, "PASS", time.monotonic() - start, summary, figures)
    except CheckFailed as exc:
        return Result(check.name, "FAIL", time.monotonic() - start, str(exc), exc.figures)
    except Exception as exc:  # noqa: BLE001  any crash is this check's failure; the others still run
        return Result(
            check.name,
            "FAIL",
            time.monotonic() - start,
            f"{type(exc).__name__}: {exc}"[:500],
            {},
            error=traceback.format_exc()[-4000:],
        )
    finally:
        free_gpu()


# ---------------------------------------------------------------------------------------------- main


def nccl_worker(out: str) -> int:
    """A torchrun worker: start NCCL the way cnnlab's runtime does, all-reduce, broadcast, and report (rank 0)."""
    import datetime as dt

    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=dt.timedelta(seconds=60), device_id=device)
    t = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(t)
    box = [{"from": rank}]
    dist.broadcast_object_list(box, src=0)
    dist.barrier()
    if rank == 0:
        report = {
            "world_size": world,
            "backend": dist.get_backend(),
            "all_reduce": t.tolist(),
            "expected": [float(world * (world + 1) / 2)] * 4,
            "broadcast": box[0],
            "nccl": nccl_version(),
        }
        save_atomic(json.dumps(report).encode(), out)
    dist.destroy_process_group()
    return 0


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(json.dumps(report, indent=1, default=str).encode(), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", nargs="?", help="folder for gpu_check.json (default: $OUT, else bench/out)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all checks together")
    parser.add_argument("--cpu-smoke", action="store_true", help="run the device-agnostic checks on the CPU, small")
    parser.add_argument("--only", help="comma-separated check names to run (the rest are skipped)")
    parser.add_argument("--nccl-worker", metavar="JSON", help=argparse.SUPPRESS)  # used by the ddp check
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    if args.nccl_worker:
        return nccl_worker(args.nccl_worker)
    out_dir = Path(args.out_dir or os.environ.get("OUT") or REPO / "bench" / "out")
    report_path = out_dir / "gpu_check.json"
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    started = time.monotonic()
    info = conditions(cuda)
    report = {
        "tool": "bench/gpu_check.py",
        "mode": "cuda" if cuda else "cpu-smoke" if args.cpu_smoke else "no-cuda",
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "budget_s": args.budget,
        "conditions": info,
        "checks": [],
    }
    if not cuda and not args.cpu_smoke:
        print(
            f"no CUDA device: nothing to check (torch {torch.__version__}, CUDA build: {torch.version.cuda}). "
            "Run it where PyTorch sees an NVIDIA GPU; --cpu-smoke runs the device-agnostic parts on this CPU."
        )
        report["exit_code"] = EXIT_NO_CUDA
        write_report(report_path, report)
        return EXIT_NO_CUDA
    print(f"gpu_check: {describe_conditions(info)}; budget {args.budget:.0f} s")
    with tempfile.TemporaryDirectory(prefix="cnnlab-gpu-check-") as tmp:
        work = Path(tmp)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
            "CNNLAB_CACHE": str(work / "cache"),
        }
        os.environ["CNNLAB_CACHE"] = env["CNNLAB_CACHE"]  # this process's probe and caches stay in the work folder
        ctx = Context(cuda, GPU_SIZES if cuda else SMOKE_SIZES, work, env, started + args.budget)
        plan = checks_for(ctx)
        only = set(args.only.split(",")) if args.only else None
        if only and only - {c.name for c in plan}:
            print(
                f"--only: unknown check(s) {', '.join(sorted(only - {c.name for c in plan}))}; checks: "
                f"{', '.join(c.name for c in plan)}",
                file=sys.stderr,
            )
            return EXIT_USAGE
        for check in plan:
            if only is not None and check.name not in only:
                continue
            result = run_check(ctx, check)
            seconds = f"{result.seconds:5.1f}s" if result.status != "SKIP" else "     -"
            print(f"{result.status:4} {result.name:<22} {seconds}  {result.summary}", flush=True)
            if result.error:
                print("     " + result.error.strip().splitlines()[-1], flush=True)
            report["checks"].append(result.__dict__)
            report["elapsed_s"] = round(time.monotonic() - started, 1)
            write_report(report_path, report)  # after every check: a run cut short keeps what it measured
    statuses = [c["status"] for c in report["checks"]]
    counts = {s: statuses.count(s) for s in ("PASS", "FAIL", "SKIP")}
    code = EXIT_FAILED if counts["FAIL"] else EXIT_OK
    report.update(
        counts={k.lower(): v for k, v in counts.items()}, exit_code=code, elapsed_s=round(time.monotonic() - started, 1)
    )
    write_report(report_path, report)
    print(
        f"gpu_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
        f"{report['elapsed_s']:.0f} s; results in {report_path}"
    )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
