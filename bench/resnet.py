"""ResNet benchmarks: resnet20 training throughput with GFLOP/s against this CPU's matmul peak, and resnet50
inference at 224x224 (batch 1 and 32) with cnnlab's inference settings against plain fp32 eager PyTorch."""
from __future__ import annotations

import statistics
import time

import torch
from common import conditions, stats
from throughput import BATCH, compare

from cnnlab import create_model
from cnnlab.engine.evaluate import autocast_for, prepare_for_inference
from cnnlab.engine.trainer import pick_precision

RESNET20_TRAIN_GFLOP = 3 * 0.0811  # per image: 81.1 MFLOP forward (40.55 M MACs), backward about twice that


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul, the best of `repeats`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def resnet20_training(repeats: int = 3, images: int = 2560) -> bool:
    results = compare("resnet20", images, repeats)
    if results is None:
        return True
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["cnnlab"] / med["conventional"]
    gflops = med["cnnlab"] * RESNET20_TRAIN_GFLOP
    fp32_peak, bf16_peak = matmul_peak(torch.float32), matmul_peak(torch.bfloat16, n=1024)
    ok = ratio >= 1.8
    print(f"  resnet20: cnnlab / conventional = {ratio:.2f}x (target >= 1.8) [{'PASS' if ok else 'FAIL'}]; "
          f"cnnlab / plain loop = {med['cnnlab'] / med['plain']:.2f}x")
    print(f"  resnet20 training at {gflops:.1f} GFLOP/s (0.243 GFLOP per image); this CPU's matmul peak: fp32 "
          f"{fp32_peak:.0f} GFLOP/s, bf16 {bf16_peak:.0f} GFLOP/s (2048^3 and 1024^3 matmuls, best of 5)")
    print(f"  conditions: {conditions(batch=BATCH, images_per_pass=images)}, cnnlab precision "
          f"{pick_precision('auto', torch.device('cpu'))}, channels_last")
    return ok


@torch.inference_mode()
def resnet50_inference(repeats: int = 5) -> bool:
    device = torch.device("cpu")
    torch.manual_seed(0)
    plain = create_model("resnet50").eval()
    tuned, bf16 = prepare_for_inference(create_model("resnet50"), device)
    for batch, iters in ((1, 10), (32, 2)):
        x = torch.randn(batch, 3, 224, 224)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        rates: dict[str, list[float]] = {"plain fp32 eager": [], "cnnlab": []}
        plain(x), tuned(x_cl)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iters):
                plain(x)
            rates["plain fp32 eager"].append(batch * iters / (time.perf_counter() - start))
            start = time.perf_counter()
            for _ in range(iters):
                with autocast_for(device, bf16):
                    tuned(x_cl)
            rates["cnnlab"].append(batch * iters / (time.perf_counter() - start))
        for name, values in rates.items():
            print(f"resnet50 inference batch {batch:>2} {name:>16}: {stats(values)} img/s")
        print(f"  ratio cnnlab / plain = {statistics.median(rates['cnnlab']) / statistics.median(rates['plain fp32 eager']):.2f}x")
    print(f"  conditions: {conditions(input='3x224x224')}, cnnlab: eval, channels_last, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, inference_mode")
    return True


def main() -> bool:
    return all([resnet20_training(), resnet50_inference()])


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
