"""Shared by the benchmarks: the conditions every result is printed with, and repeat statistics."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cnnlab.training.runtime import cpu_flags, device_name  # noqa: E402


def conditions(**extra) -> str:
    parts = {
        "cpu": device_name(torch.device("cpu")),
        "flags": "+".join(cpu_flags()) or "none",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **extra,
    }
    return ", ".join(f"{k} {v}" for k, v in parts.items())


def stats(values: list[float]) -> str:
    fmt = "{:,.1f}" if max(values) < 100 else "{:,.0f}"  # small rates (resnet50 on 2 cores) need a decimal
    return f"min {fmt.format(min(values))} / median {fmt.format(statistics.median(values))} over {len(values)} repeats"


def shared_cifar10() -> Path | None:
    here = Path(__file__).resolve().parents[1]
    for candidate in (os.environ.get("CNNLAB_CIFAR10_DIR"), here.parent / "shared" / "datasets"):
        if candidate and (Path(candidate) / "cifar-10-batches-bin").is_dir():
            return Path(candidate)
    return None


def no_data(what: str) -> bool:
    """A benchmark whose data is missing has measured nothing: it fails, saying how to give it the data."""
    print(
        f"{what}: FAILED, nothing measured: no shared CIFAR-10 copy next to the checkout (../shared/datasets); "
        "set CNNLAB_CIFAR10_DIR to a folder holding cifar-10-batches-bin/"
    )
    return False


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul, the best of `repeats`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def train_on(model, optimizer, batches) -> int:
    """Plain training steps over `batches` (the baselines' loop); returns the number of images seen."""
    import torch.nn.functional as F

    n = 0
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n += len(y)
    return n
