"""What the per-step finiteness check (loss and every gradient, one host sync) costs against a whole step.

Run: python bench/nan_check.py. The check is the trainer's own expression; the step is a plain SGD step.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from common import conditions

from cnnlab.models import create_model


def finite(model, loss) -> bool:
    """As in training/trainer.py: non-finite when the loss or any gradient is."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.isfinite(loss + torch.stack(torch._foreach_norm(grads, 1)).sum()))


def measure(name: str, shape: tuple[int, ...], repeats: int = 20, **model_args) -> float:
    torch.manual_seed(0)
    model = create_model(name, **model_args).to(memory_format=torch.channels_last)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (shape[0],))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    steps, checks, loss_only = [], [], []
    for i in range(repeats + 3):
        tic = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step = time.perf_counter() - tic
        tic = time.perf_counter()
        bool(torch.isfinite(loss))
        only = time.perf_counter() - tic
        tic = time.perf_counter()
        finite(model, loss)
        check = time.perf_counter() - tic
        if i >= 3:  # warm-up
            steps.append(step), checks.append(check), loss_only.append(only)
    step_ms, check_ms = statistics.median(steps) * 1e3, statistics.median(checks) * 1e3
    print(
        f"{name} {shape}: step {step_ms:.2f} ms, loss+gradient check {check_ms:.3f} ms "
        f"({check_ms / step_ms:.2%} of a step), loss-only check {statistics.median(loss_only) * 1e3:.3f} ms; "
        f"medians of {repeats}"
    )
    return check_ms / step_ms


def main() -> bool:
    print(f"NaN check overhead ({conditions()})")
    measure("convnet", (128, 1, 28, 28), in_channels=1, input_size=[28, 28])
    measure("resnet20", (128, 3, 32, 32))
    return True


if __name__ == "__main__":
    main()
