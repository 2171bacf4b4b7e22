"""Inference throughput of an exported model on onnxruntime's CPU provider against cnnlab's own PyTorch inference
(inference/evaluate.py inference_runtime + prepare_for_inference: eval, the memory format and bf16 autocast that
cnnlab's measured CPU probe picks), both on 2 threads, in the same run. Where cnnlab picks bf16, plain fp32 PyTorch is measured too,
so that the fp32 ONNX model also has an fp32 baseline.

Run: python bench/export.py. Random weights: speed does not depend on their values.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
from common import conditions, stats

from cnnlab import create_model
from cnnlab.inference.evaluate import inference_runtime, prepare_for_inference
from cnnlab.inference.export import WithNormalisation, capture, onnx_bytes, run_onnx

THREADS = 2
CASES = [  # model, input shape, (batch, forward passes per repeat)
    ("resnet20", (3, 32, 32), ((1, 50), (128, 2))),
    ("resnet50", (3, 224, 224), ((1, 5), (16, 1))),
]


def cpu_flags() -> str:
    try:
        flags = set(
            next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
            .split(":", 1)[1]
            .split()
        )
    except (OSError, StopIteration):
        return "flags unknown"
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))


def rate(run, x, batch: int, passes: int) -> float:
    start = time.perf_counter()
    for _ in range(passes):
        run(x)
    return batch * passes / (time.perf_counter() - start)


def measure(name: str, shape: tuple[int, int, int], batches, repeats: int = 5) -> None:
    device = torch.device("cpu")
    torch.manual_seed(0)
    fp32 = WithNormalisation(create_model(name), [0.5] * 3, [0.25] * 3).eval()
    session = run_onnx(
        onnx_bytes(capture(fp32, shape), {"model": name, "input": "[0, 1]", "output": "logits"}), threads=THREADS
    )
    runtime = inference_runtime(device)
    print(
        f"cnnlab picks {runtime.precision} ({runtime.precision_reason}), channels_last {runtime.channels_last} "
        f"({runtime.channels_last_reason})"
    )
    tuned = prepare_for_inference(copy.deepcopy(fp32), runtime)
    time_runtimes(name, shape, batches, repeats, session, fp32, tuned, runtime)


@torch.inference_mode()
def time_runtimes(name, shape, batches, repeats, session, fp32, tuned, runtime) -> None:
    bf16 = runtime.precision == "bf16"

    def cnnlab_run(x):
        with runtime.autocast():
            return tuned(x.contiguous(memory_format=runtime.memory_format))

    runners = {
        "onnxruntime fp32": lambda x: session(x.numpy()),
        f"cnnlab PyTorch {'bf16' if bf16 else 'fp32'}": cnnlab_run,
    }
    if bf16:
        runners["PyTorch fp32 eager"] = fp32
    for batch, passes in batches:
        x = torch.rand(batch, *shape)
        for run in runners.values():  # warm-up: allocators, oneDNN primitives, onnxruntime's arena
            run(x), run(x)
        rates: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(repeats):  # interleaved, so that load from other processes hits every runtime alike
            for label, run in runners.items():
                rates[label].append(rate(run, x, batch, passes))
        for label, values in rates.items():
            print(f"{name} {'x'.join(map(str, shape))} batch {batch:>3} {label:>22}: {stats(values)} img/s")
        base = next(k for k in rates if k.startswith("cnnlab"))
        ratios = "; ".join(
            f"{k} / {base} = {statistics.median(rates[k]) / statistics.median(rates[base]):.2f}x "
            f"(min/min {min(rates[k]) / min(rates[base]):.2f}x)"
            for k in rates
            if k != base
        )
        print(f"  {ratios}")


def main() -> bool:
    import onnxruntime

    torch.set_num_threads(THREADS)
    print(
        f"Exported model on onnxruntime against cnnlab's PyTorch inference "
        f"({conditions(onnxruntime=onnxruntime.__version__)}, {cpu_flags()}; onnxruntime intra_op_num_threads "
        f"{THREADS}, CPUExecutionProvider, opset 18; "
        "img/s over 5 repeats; timings on a shared machine are noisy)"
    )
    for name, shape, batches in CASES:
        measure(name, shape, batches)
    return True


if __name__ == "__main__":
    main()
