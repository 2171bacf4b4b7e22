"""Shared by the benchmarks: the conditions every result is printed with, and repeat statistics."""
from __future__ import annotations

import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cnnlab.engine.trainer import _device_name  # noqa: E402


def conditions(**extra) -> str:
    parts = {"cpu": _device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "python": platform.python_version(), **extra}
    return ", ".join(f"{k} {v}" for k, v in parts.items())


def stats(values: list[float]) -> str:
    fmt = "{:,.1f}" if max(values) < 100 else "{:,.0f}"  # small rates (resnet50 on 2 cores) need a decimal
    return (f"min {fmt.format(min(values))} / median {fmt.format(statistics.median(values))} "
            f"over {len(values)} repeats")


def shared_cifar10() -> Path | None:
    here = Path(__file__).resolve().parents[1]
    for candidate in (os.environ.get("CNNLAB_CIFAR10_DIR"), here.parent / "shared" / "datasets"):
        if candidate and (Path(candidate) / "cifar-10-batches-bin").is_dir():
            return Path(candidate)
    return None
