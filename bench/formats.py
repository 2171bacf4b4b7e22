"""Precision, memory format and torch.compile on this CPU: training-step throughput of convnet and resnet20 in
each setting, as ratios against fp32 NCHW eager measured in the same run, with the matmul peaks and what
`--precision auto` / `--channels-last auto` pick here (and why). The figures on these in docs/results.md come from here.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from common import conditions, matmul_peak, stats

from cnnlab import create_model
from cnnlab.inference.evaluate import inference_runtime

BATCH = 128
SETTINGS = {  # name: (precision, channels_last, compile)
    "fp32 NCHW": ("fp32", False, False),
    "fp32 channels_last": ("fp32", True, False),
    "bf16 channels_last": ("bf16", True, False),
    "fp32 channels_last compiled": ("fp32", True, True),
}


def _steps_per_second(model_name: str, precision: str, channels_last: bool, compiled: bool, steps: int) -> float:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(
        model_name, num_classes=10, in_channels=3, **({"input_size": [32, 32]} if model_name == "convnet" else {})
    ).to(memory_format=fmt)
    step_model = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(BATCH, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (BATCH,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(step_model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up (compilation, oneDNN kernel selection)
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - start)


def main(repeats: int = 3) -> bool:
    runtime = inference_runtime("cpu")
    print(
        f"formats: --precision auto picks {runtime.precision} ({runtime.precision_reason}); --channels-last auto "
        f"picks {'on' if runtime.channels_last else 'off'} ({runtime.channels_last_reason})"
    )
    print(
        f"  matmul peak: fp32 {matmul_peak(torch.float32):.0f} GFLOP/s, bf16 "
        f"{matmul_peak(torch.bfloat16):.0f} GFLOP/s (2048^3, best of 5)"
    )
    for model_name, steps in (("convnet", 20), ("resnet20", 4)):
        rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for _ in range(repeats):  # interleaved, so that drifts in machine load hit every setting alike
            for name, (precision, channels_last, compiled) in SETTINGS.items():
                if compiled and model_name != "convnet":
                    continue  # compiling resnet20 takes minutes on 2 cores; convnet shows the effect
                rates[name].append(_steps_per_second(model_name, precision, channels_last, compiled, steps))
        base = statistics.median(rates["fp32 NCHW"])
        for name, values in rates.items():
            if values:
                print(
                    f"formats {model_name:<8} {name:<28}: {stats(values)} img/s, "
                    f"{statistics.median(values) / base:.2f}x fp32 NCHW"
                )
    print(f"  conditions: {conditions(batch=BATCH, input='3x32x32')}, SGD momentum, training steps")
    return True


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
