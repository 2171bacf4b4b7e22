"""Loader throughput: augmented 3x32x32 batches (random crop with reflect padding, flip, normalise)."""

from __future__ import annotations

import statistics
import time

import torch
from common import conditions, stats

from cnnlab.data import InMemoryLoader, parse_augment

TARGET = 100_000  # img/s


def main(repeats: int = 5) -> bool:
    images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (50_000,))
    rates = []
    for _ in range(repeats):
        loader = InMemoryLoader(
            images,
            labels,
            512,
            mean=[0.49, 0.48, 0.45],
            std=[0.25, 0.24, 0.26],
            shuffle=True,
            augment=parse_augment("crop:4:reflect,flip"),
            channels_last=False,
        )
        start = time.perf_counter()
        n = sum(len(y) for _, y in loader)
        rates.append(n / (time.perf_counter() - start))
    ok = statistics.median(rates) >= TARGET
    print(f"loader: {stats(rates)} img/s (target >= {TARGET:,}) [{'PASS' if ok else 'FAIL'}]")
    print(f"  conditions: {conditions(batch=512, images=50_000, augment='crop:4:reflect,flip + normalise')}")
    return ok


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
