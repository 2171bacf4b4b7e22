"""ResNet benchmarks: resnet20 training throughput with GFLOP/s against this CPU's matmul peak, and resnet50
inference at 224x224 (batch 1 and 32) with cnnlab's inference settings against plain fp32 eager PyTorch."""

from __future__ import annotations

import statistics
import time

import torch
from common import conditions, matmul_peak, no_data, stats
from throughput import BATCH, CHOSEN, compare

from cnnlab import create_model
from cnnlab.inference.evaluate import inference_runtime, prepare_for_inference

RESNET20_TRAIN_GFLOP = 3 * 0.0811  # per image: 81.1 MFLOP forward (40.55 M MACs), backward about twice that


def resnet20_training(repeats: int = 3, images: int = 2560) -> bool:
    results = compare("resnet20", images, repeats)
    if results is None:
        return no_data("resnet20 training")
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["cnnlab"] / med["conventional"]
    gflops = med["cnnlab"] * RESNET20_TRAIN_GFLOP
    fp32_peak, bf16_peak = matmul_peak(torch.float32), matmul_peak(torch.bfloat16, n=1024)
    ok = ratio >= 1.8
    print(
        f"  resnet20: cnnlab / conventional = {ratio:.2f}x (target >= 1.8) [{'PASS' if ok else 'FAIL'}]; "
        f"cnnlab / plain loop = {med['cnnlab'] / med['plain']:.2f}x"
    )
    print(
        f"  resnet20 training at {gflops:.1f} GFLOP/s (0.243 GFLOP per image); this CPU's matmul peak: fp32 "
        f"{fp32_peak:.0f} GFLOP/s, bf16 {bf16_peak:.0f} GFLOP/s (2048^3 and 1024^3 matmuls, best of 5)"
    )
    print(f"  conditions: {conditions(batch=BATCH, images_per_pass=images)}, cnnlab precision {CHOSEN.get('resnet20')}")
    return ok


@torch.inference_mode()
def resnet50_inference(repeats: int = 5) -> bool:
    torch.manual_seed(0)
    plain = create_model("resnet50").eval()
    runtime = inference_runtime("cpu")
    tuned = prepare_for_inference(create_model("resnet50"), runtime)
    for batch, iters in ((1, 10), (32, 2)):
        x = torch.randn(batch, 3, 224, 224)
        x_cl = x.contiguous(memory_format=runtime.memory_format)
        rates: dict[str, list[float]] = {"plain fp32 eager": [], "cnnlab": []}
        plain(x), tuned(x_cl)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iters):
                plain(x)
            rates["plain fp32 eager"].append(batch * iters / (time.perf_counter() - start))
            start = time.perf_counter()
            for _ in range(iters):
                with runtime.autocast():
                    tuned(x_cl)
            rates["cnnlab"].append(batch * iters / (time.perf_counter() - start))
        for name, values in rates.items():
            print(f"resnet50 inference batch {batch:>2} {name:>16}: {stats(values)} img/s")
        print(
            f"  ratio cnnlab / plain = {statistics.median(rates['cnnlab']) / statistics.median(rates['plain fp32 eager']):.2f}x"
        )
    print(
        f"  conditions: {conditions(input='3x224x224')}, cnnlab: eval, "
        f"{'channels_last' if runtime.channels_last else 'NCHW'}, {runtime.precision}, inference_mode"
    )
    return True


def main() -> bool:
    return all([resnet20_training(), resnet50_inference()])


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
