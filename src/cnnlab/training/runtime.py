"""Where and how a run computes: the device, the precision, the memory format, CPU threads, and the processes
of a distributed run (torchrun: gloo on CPU, NCCL on CUDA).

`precision auto` and `channels_last auto` are decided on the CPU by measurement. A training run measures its
own model at its input size (`probe_model`: a few training steps in each setting, interleaved, best of several
rounds, a few seconds at most; cached per CPU, torch version, thread count, model, its arguments, input shape
and batch). Where there is no model to measure, or the run is too short to pay for it, a small stand-in conv
step decides (`probe_cpu`, a few milliseconds). CPU flags alone do not tell: some CPUs with AVX512-BF16 (and
no AMX) run bf16 convolutions slower than fp32, PyTorch's own `_is_mkldnn_bf16_supported()` is true on CPUs
that only emulate bf16, and which setting wins depends on the model: for a 224-pixel streaming model of a few
parameters the stand-in chose bf16 + channels_last, and fp32 NCHW was 1.25x faster (issue 23).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..files import save_atomic

__all__ = [
    "Runtime",
    "start_runtime",
    "pick_device",
    "pick_precision",
    "pick_channels_last",
    "decide_precision",
    "decide_channels_last",
    "probe_cpu",
    "probe_model",
    "settle_for_model",
    "cpu_flags",
    "device_name",
    "distributed_env",
]

# bf16 must win clearly: it also costs accuracy. channels_last only needs to be faster.
BF16_MIN_SPEEDUP = 1.2
CHANNELS_LAST_MIN_SPEEDUP = 1.05
_PROBE_VERSION = 2  # 2: settings interleaved, best of 5 rounds
_MODEL_PROBE_VERSION = 1
MODEL_PROBE_BUDGET_S = 3.0  # the measured rounds of a model probe, all settings together
MODEL_PROBE_MAX_BATCH = 64
# A run is measured only when its training images number at least this many times the probe's (warm-up and all
# rounds at the probe batch): shorter runs (tests, demos) keep the stand-in, unless the answer is cached.
MODEL_PROBE_MIN_RUN = 2
_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8")


def cpu_flags() -> list[str]:
    """The CPU flags that decide how fast convolutions run here (Linux; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in _FLAGS_OF_INTEREST if f in present]
    except OSError:
        pass
    return []


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'} ({os.cpu_count()} cores)"


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' takes CUDA when present; in a distributed run on CUDA each local rank takes its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:
        raise ConfigError(
            f"--device {name} would put every process of this machine on one GPU; give --device cuda "
            "(or auto): each local rank then takes its own GPU"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", local_rank % count)
        elif device.index >= count:
            raise ConfigError(
                f"device {name!r} asked for, but this machine has {count} CUDA GPU(s), cuda:0 to "
                f"cuda:{count - 1}; use --device cuda or one of those"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        # otherwise PyTorch fails later, after the data is loaded, with a RuntimeError
        raise ConfigError(f"device {name!r} asked for, but PyTorch sees no Apple GPU (MPS); use --device cpu or auto")
    return device


# ---------------------------------------------------------------------------------------------- the CPU probe

_PROBE_SETTINGS = {
    "fp32_nchw_ms": ("fp32", False),
    "fp32_channels_last_ms": ("fp32", True),
    "bf16_channels_last_ms": ("bf16", True),
}


def _probe_steps_ms(rounds: int = 5) -> dict[str, float]:
    """Milliseconds of one training step of a small conv net (batch 32, 3x32x32) in each setting: the best of
    `rounds`, the settings taking turns so that a burst of load elsewhere hits them alike."""
    # a step needs autograd, also when inference code (inside inference_mode) asks for the decision
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        steps = {name: _probe_step(*setting) for name, setting in _PROBE_SETTINGS.items()}
        for step in steps.values():  # the first step warms up oneDNN's kernels
            step()
        best = {name: float("inf") for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                tic = time.perf_counter()
                step()
                best[name] = min(best[name], (time.perf_counter() - tic) * 1000)
        return best


def _probe_step(precision: str, channels_last: bool):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    if channels_last:
        # Module.to takes memory_format at run time; its stub does not list it
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()

    return step


def _probe_cache() -> Path:
    from ..data.datasets import cache_dir

    return cache_dir() / "probe.json"


def _cached_probe(key_parts: list, measure, say, allowed: bool = True) -> dict | None:
    """The probe.json entry for `key_parts`, or `measure()`'s result, stored there (None when nothing is cached
    and measuring is not `allowed`); `say(result, path)` is called only after a measurement."""
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]
    path = _probe_cache()
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and isinstance(cached.get(key), dict):
            return cached[key]
    except (OSError, ValueError):
        cached = {}
    if not allowed:
        return None
    result = {
        **measure(),
        "threads": torch.get_num_threads(),
        "cpu": device_name(torch.device("cpu")),
        "flags": cpu_flags(),
        "torch": torch.__version__,
    }
    say(result, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(json.dumps({**(cached if isinstance(cached, dict) else {}), key: result}, indent=1).encode(), path)
    except OSError:
        pass  # a read-only cache: measure again next time
    return result


def probe_cpu(log=None) -> dict:
    """Step times (ms) of fp32/bf16 x NCHW/channels_last on this CPU at the current thread count; measured
    once per CPU model, flag set, torch version and thread count, then read from the cache."""
    key_parts = [
        _PROBE_VERSION,
        device_name(torch.device("cpu")),
        cpu_flags(),
        torch.__version__,
        torch.get_num_threads(),
    ]

    def say(result, path):
        if log:
            log(
                f"measured this CPU once (cached in {path}): fp32 {result['fp32_nchw_ms']:.1f} ms NCHW, "
                f"{result['fp32_channels_last_ms']:.1f} ms channels_last; bf16 {result['bf16_channels_last_ms']:.1f} ms"
            )

    return cast(dict, _cached_probe(key_parts, _probe_steps_ms, say))  # measuring allowed: never None


def _model_steps_ms(
    model: torch.nn.Module, input_shape: tuple[int, ...], batch: int, budget_s: float, rounds: int
) -> dict:
    """Milliseconds of one training step (forward, loss, backward) of copies of `model` on random
    `batch` x `input_shape` inputs in each setting: one warm-up step each, then up to `rounds` rounds with the
    settings taking turns, as many as `budget_s` allows (at least one); the best of each."""
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        steps = {}
        for name, (precision, channels_last) in _PROBE_SETTINGS.items():
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            # Module.to takes memory_format at run time; its stub does not list it
            copy_ = copy.deepcopy(model).cpu().train().to(memory_format=fmt)  # type: ignore[call-overload]
            x = torch.randn(batch, *input_shape).contiguous(memory_format=fmt)
            y = torch.zeros(batch, dtype=torch.long)  # class 0 exists in every model

            def step(m=copy_, x=x, y=y, bf16=precision == "bf16") -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = torch.nn.functional.cross_entropy(m(x).float(), y)
                m.zero_grad(set_to_none=True)
                loss.backward()

            steps[name] = step
        warm = {}
        for name, step in steps.items():  # the first step creates oneDNN's kernels; it also tells the cost
            tic = time.perf_counter()
            step()
            warm[name] = time.perf_counter() - tic
        rounds = max(1, min(rounds, int(budget_s / max(sum(warm.values()), 1e-9))))
        best = {name: float("inf") for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                tic = time.perf_counter()
                step()
                best[name] = min(best[name], (time.perf_counter() - tic) * 1000)
        return {**best, "rounds": rounds, "batch": batch}


def probe_model(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    batch: int,
    *,
    name: str,
    args: dict,
    budget_s: float = MODEL_PROBE_BUDGET_S,
    rounds: int = 5,
    measure: bool = True,
    log=None,
) -> dict | None:
    """Step times (ms) of this model at this input shape and batch in fp32 NCHW, fp32 channels_last and bf16
    channels_last; measured once per CPU, torch version, thread count, model name, arguments, input shape and
    batch, then read from the cache (None if not cached and not `measure`)."""
    batch = max(1, min(batch, MODEL_PROBE_MAX_BATCH))
    key_parts = [
        _MODEL_PROBE_VERSION,
        device_name(torch.device("cpu")),
        cpu_flags(),
        torch.__version__,
        torch.get_num_threads(),
        name,
        json.loads(json.dumps(args, default=str)),
        list(input_shape),
        batch,
    ]

    def say(result, path):
        if log:
            log(
                f"measured {name} at {'x'.join(map(str, input_shape))}, batch {batch} ({result['rounds']} rounds, "
                f"cached in {path}): fp32 {result['fp32_nchw_ms']:.1f} ms NCHW, {result['fp32_channels_last_ms']:.1f} "
                f"ms channels_last; bf16 {result['bf16_channels_last_ms']:.1f} ms per step"
            )

    return _cached_probe(
        key_parts, lambda: _model_steps_ms(model, tuple(input_shape), batch, budget_s, rounds), say, allowed=measure
    )


def settle_for_model(
    runtime: Runtime,
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    batch: int,
    run_images: float,
    *,
    name: str,
    args: dict,
    log=None,
) -> bool:
    """Where precision or channels_last is 'auto' on the CPU, decide it again by measuring the run's own model
    (`probe_model`; rank 0 measures, every rank follows). A run of fewer than MODEL_PROBE_MIN_RUN times the
    probe's images keeps the stand-in probe's decision, unless the answer for this model is cached. Returns
    whether the memory format changed: the caller then moves its model and loaders."""
    if not (runtime.auto_precision or runtime.auto_channels_last):
        return False
    decision = None
    if runtime.is_main:
        probe_batch = max(1, min(batch, MODEL_PROBE_MAX_BATCH))
        probe_images = (1 + 5) * len(_PROBE_SETTINGS) * probe_batch  # warm-up and at most 5 rounds
        long_enough = run_images >= MODEL_PROBE_MIN_RUN * probe_images
        probe = probe_model(model, input_shape, batch, name=name, args=args, measure=long_enough, log=log)
        if probe is not None:  # else the stand-in's decision stands, and its reasons say what it measured
            what = f"for {name} at {'x'.join(map(str, input_shape))}"
            precision, why = (
                decide_precision(probe, what)
                if runtime.auto_precision
                else (runtime.precision, runtime.precision_reason)
            )
            channels_last, cl_why = (
                decide_channels_last(probe, precision, what)
                if runtime.auto_channels_last
                else (runtime.channels_last, runtime.channels_last_reason)
            )
            decision = (
                precision,
                why,
                channels_last,
                cl_why,
                {**probe, "model": name, "input_shape": list(input_shape)},
            )
    decision = runtime.broadcast(decision)
    if decision is None:
        return False
    before = runtime.channels_last
    runtime.precision, runtime.precision_reason, runtime.channels_last, runtime.channels_last_reason, runtime.probe = (
        decision
    )
    return runtime.channels_last != before


def decide_precision(probe: dict, what: str = "") -> tuple[str, str]:
    """(precision, why) from probe timings: bf16 only where it is clearly faster than fp32. `what` names what
    was measured (e.g. "for resnet20 at 3x32x32"); the stand-in probe's reasons say nothing."""
    fp32 = min(probe["fp32_nchw_ms"], probe["fp32_channels_last_ms"])  # against fp32 at its best layout
    bf16 = probe["bf16_channels_last_ms"]
    speedup = fp32 / bf16
    what = f" {what}" if what else ""
    if speedup >= BF16_MIN_SPEEDUP:
        return "bf16", f"bf16 autocast measured {speedup:.2f}x faster than fp32{what} on this CPU"
    return "fp32", (
        f"bf16 autocast measured {speedup:.2f}x the speed of fp32{what} on this CPU (bf16 needs "
        f">= {BF16_MIN_SPEEDUP}x; flags: {', '.join(probe.get('flags') or ['none'])})"
    )


def decide_channels_last(probe: dict, precision: str, what: str = "") -> tuple[bool, str]:
    nchw, nhwc = probe["fp32_nchw_ms"], probe["fp32_channels_last_ms"]
    if precision == "bf16":
        return True, "bf16 kernels of oneDNN work in channels_last"
    speedup = nchw / nhwc
    what = f" {what}" if what else ""
    if speedup >= CHANNELS_LAST_MIN_SPEEDUP:
        return True, f"channels_last measured {speedup:.2f}x faster than NCHW{what} on this CPU"
    return False, f"channels_last measured {speedup:.2f}x the speed of NCHW{what} on this CPU"


def pick_precision(name: str, device: torch.device, log=None) -> tuple[str, str]:
    """(precision, why) for 'auto', 'fp32' or 'bf16'."""
    if name != "auto":
        return name, "asked for"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{device_name(device)} computes bf16 natively"
        return "fp32", f"{device_name(device)} has no bf16"
    if device.type != "cpu":
        return "fp32", f"auto takes fp32 on {device.type}"
    return decide_precision(probe_cpu(log))


def pick_channels_last(name: str, device: torch.device, precision: str, log=None) -> tuple[bool, str]:
    if name != "auto":
        return name == "on", "asked for"
    if device.type == "cuda":
        return True, "CUDA convolutions in channels_last use tensor cores"
    if device.type != "cpu":
        return False, f"auto keeps NCHW on {device.type}"
    return decide_channels_last(probe_cpu(log), precision)


# ---------------------------------------------------------------------------------------------- distributed


def distributed_env() -> dict[str, Any]:
    """What torchrun tells its workers (all zeros/ones in a plain process)."""
    env = os.environ
    return {
        "rank": int(env.get("RANK", 0)),
        "world_size": int(env.get("WORLD_SIZE", 1)),
        "local_rank": int(env.get("LOCAL_RANK", 0)),
        "local_world_size": int(env.get("LOCAL_WORLD_SIZE", 1)),
        "restart_count": int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
        "run_id": env.get("TORCHELASTIC_RUN_ID"),
        "elastic": "TORCHELASTIC_RUN_ID" in env,
    }


@dataclass
class Runtime:
    """The decisions of one process of a run, and the collectives it shares with its peers."""

    device: torch.device
    precision: str = "fp32"
    precision_reason: str = ""
    channels_last: bool = False
    channels_last_reason: str = ""
    threads: int = 1
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restart_count: int = 0
    elastic_run_id: str | None = None
    auto_precision: bool = False  # asked for 'auto' on a CPU: `settle_for_model` may decide again
    auto_channels_last: bool = False
    probe: dict | None = None  # the model probe's step times, when it decided

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place across ranks (a no-op in one process); returns the tensor."""
        if self.distributed:
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (plain data only: it travels pickled between our
        own processes, never from a file)."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def describe(self) -> str:
        where = device_name(self.device)
        ranks = f", {self.world_size} processes ({dist.get_backend()})" if self.distributed else ""
        return (
            f"{where}{ranks}, {self.precision}, {'channels_last' if self.channels_last else 'NCHW'}, "
            f"{self.threads} threads"
        )

    def as_dict(self) -> dict:
        return {
            "device": device_name(self.device),
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "channels_last": self.channels_last,
            "channels_last_reason": self.channels_last_reason,
            "threads": self.threads,
            "world_size": self.world_size,
            "backend": dist.get_backend() if self.distributed else None,
            "precision_probe": self.probe,
        }


def _restart_store(env: dict[str, Any], timeout: datetime.timedelta) -> dict[str, Any]:
    """After a torchrun restart on one machine, the process group meets under a key prefix of its own attempt.

    torch 2.13's agent store can still hold the previous attempt's keys: a restarted rank 0 was seen reading the
    address of the killed rank 1 and failing to connect, and the next attempt then hung in gloo's connect. A
    prefix per attempt keeps each attempt's addresses apart. Only where one agent launches every rank
    (local world = world): several agents count their restarts each on their own, so their attempt numbers
    need not agree, and there torch's own store layout is kept."""
    if (
        env["restart_count"] == 0
        or env["local_world_size"] != env["world_size"]
        or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    ):  # else rank 0 hosts the store: torch's way
        return {}
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env["world_size"], is_master=False, timeout=timeout
    )
    return {
        "store": dist.PrefixStore(f"cnnlab/attempt_{env['restart_count']}", store),
        "rank": env["rank"],
        "world_size": env["world_size"],
    }


@contextlib.contextmanager
def start_runtime(
    device: str = "auto",
    precision: str = "auto",
    channels_last: str = "auto",
    threads: int = 0,
    deterministic: bool = False,
    log=None,
) -> Iterator[Runtime]:
    """Set up this process for a run (threads, determinism switches, the process group under torchrun) and
    put every process-wide switch back afterwards."""
    env = distributed_env()
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.get_num_threads(),
    )
    started_group = False
    try:
        dev = pick_device(device, env["local_rank"])
        if threads:
            torch.set_num_threads(threads)
        elif env["local_world_size"] > 1 and dev.type == "cpu":
            # ranks on one machine share its cores; oversubscribing them makes every rank slower
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env["local_world_size"]))
        if deterministic:  # every switch PyTorch's reproducibility notes list; seeds are set by the caller
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: set it first
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        if env["world_size"] > 1 and not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            backend = "nccl" if dev.type == "cuda" else "gloo"
            # a peer that dies is noticed at once by its sockets; the timeout only bounds a rank that hangs
            timeout = datetime.timedelta(minutes=10)
            device_id: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend, timeout=timeout, **_restart_store(env, timeout), **device_id)
            started_group = True
        # rank 0 decides (and alone may write the probe's cache); the others follow, so every rank computes alike
        decision: list[Any] = [None]
        if env["rank"] == 0:
            prec, prec_why = pick_precision(precision, dev, log)
            decision = [(prec, prec_why, *pick_channels_last(channels_last, dev, prec))]
        if started_group or dist.is_initialized():
            dist.broadcast_object_list(decision, src=0)
        prec, prec_why, cl, cl_why = decision[0]
        yield Runtime(
            dev,
            prec,
            prec_why,
            cl,
            cl_why,
            torch.get_num_threads(),
            env["rank"],
            env["world_size"],
            env["local_rank"],
            env["local_world_size"],
            env["restart_count"],
            env["run_id"],
            auto_precision=precision == "auto" and dev.type == "cpu",
            auto_channels_last=channels_last == "auto" and dev.type == "cpu",
        )
    finally:
        if started_group and dist.is_initialized():
            dist.destroy_process_group()
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2], previous[3]
        torch.set_num_threads(previous[4])
