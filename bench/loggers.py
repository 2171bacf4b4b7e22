"""What the experiment loggers cost per training step, against one step of the lecture's convnet.

Run: python bench/loggers.py. Each logger set takes a few thousand log_step calls (loss as a 0-d tensor, as the
trainer hands it over, and the learning rate), with an epoch row every 500 steps. The median log_step is a list
append; the points reach TensorBoard and MLflow at each epoch end (or every 1000 steps, or 10 s), so the cost that
counts is everything spent in log_step and log_epoch divided by the steps.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import conditions

from cnnlab.models import create_model
from cnnlab.training.config import TrainConfig
from cnnlab.training.loggers import build_loggers

CALLS, EPOCH_EVERY = 3000, 500


def step_seconds(repeats: int = 20) -> float:
    torch.manual_seed(0)
    model = create_model("convnet", in_channels=1, input_size=[28, 28])
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    times = []
    for i in range(repeats + 3):
        tic = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 3:
            times.append(time.perf_counter() - tic)
    return statistics.median(times)


def logging_seconds(names: str, folder: Path) -> tuple[float, float, float, float]:
    """(median log_step, median log_epoch, all of log_step and log_epoch per step, close) in seconds."""
    run_dir = folder / names.replace(",", "-")
    run_dir.mkdir()
    group = build_loggers(
        names, run_dir, config=TrainConfig(), resume=False, start_step=0, mlflow_uri=f"sqlite:///{folder}/mlflow.db"
    )
    row = {
        "epoch": 1,
        "lr": 0.05,
        "train_loss": 0.5,
        "train_acc": 0.8,
        "test_loss": 0.4,
        "test_acc": 0.85,
        "seconds": 10.0,
        "img_per_s": 5000.0,
    }
    steps, epochs = [], []
    loss = torch.tensor(0.5)
    for step in range(1, CALLS + 1):
        tic = time.perf_counter()
        group.log_step(step, {"train_loss": loss, "lr": 0.05})
        steps.append(time.perf_counter() - tic)
        if step % EPOCH_EVERY == 0:
            tic = time.perf_counter()
            group.log_epoch(step // EPOCH_EVERY, step, row)
            epochs.append(time.perf_counter() - tic)
    tic = time.perf_counter()
    group.close()
    return (
        statistics.median(steps),
        statistics.median(epochs),
        (sum(steps) + sum(epochs)) / CALLS,
        time.perf_counter() - tic,
    )


def main() -> bool:
    print(f"Logger cost per step ({conditions(calls=CALLS, epoch_every=EPOCH_EVERY)})")
    step = step_seconds()
    print(f"baseline: convnet step, batch 128 fp32: {step * 1e3:.2f} ms (median of 20)")
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        warm.mkdir()
        # creating the SQLite store's tables takes seconds, once per store: not part of a step
        build_loggers(
            "mlflow", warm, config={}, resume=False, start_step=0, mlflow_uri=f"sqlite:///{tmp}/mlflow.db"
        ).close()
        for names in ("csv", "tensorboard", "mlflow", "tensorboard,mlflow"):
            median, epoch, per_step, close = logging_seconds(names, Path(tmp))
            print(
                f"{names:>18}: log_step median {median * 1e6:5.2f} us; log_epoch median {epoch * 1e3:7.2f} ms; "
                f"all per step {per_step * 1e6:7.2f} us = {per_step / step:.3%} of a step; "
                f"close {close * 1e3:.1f} ms"
            )
    return True


if __name__ == "__main__":
    main()
