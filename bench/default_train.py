"""`cnnlab train` with its defaults: the lecture's convnet on Fashion-MNIST; accuracy and training time."""

from __future__ import annotations

import tempfile

from common import conditions

from cnnlab import TrainConfig, fit

TARGET_ACCURACY, MAX_TRAIN_SECONDS = 0.910, 60.0


def main() -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        summary = fit(TrainConfig(run_dir=f"{tmp}/run", progress="none"), log=lambda m: None)
    acc, seconds = summary["test_accuracy"], summary["train_seconds"]
    ok = acc >= TARGET_ACCURACY and seconds <= MAX_TRAIN_SECONDS
    print(
        f"default train: test accuracy {acc:.4f} after {summary['epochs']} epochs, {seconds:.1f} s of training "
        f"({summary['wall_seconds']:.1f} s wall, with data loading and per-epoch evaluation) "
        f"(targets >= {TARGET_ACCURACY}, <= {MAX_TRAIN_SECONDS:.0f} s) [{'PASS' if ok else 'FAIL'}]"
    )
    print(f"  conditions: {conditions(precision=summary['precision'], channels_last=summary['channels_last'])}, 1 run")
    return ok


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
