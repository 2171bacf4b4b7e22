"""convnet on the shared CIFAR-10 copy for 10 epochs: the test accuracy quoted in docs/results.md."""

from __future__ import annotations

import tempfile

from common import conditions, no_data, shared_cifar10

from cnnlab import TrainConfig, fit


def main(epochs: int = 10) -> bool:
    data_dir = shared_cifar10()
    if data_dir is None:
        return no_data("cifar10 convnet")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            dataset="cifar10", data_dir=str(data_dir), epochs=epochs, run_dir=f"{tmp}/run", progress="none"
        )
        summary = fit(cfg, log=lambda m: None)
    print(
        f"cifar10 convnet: test accuracy {summary['test_accuracy']:.4f} after {epochs} epochs, "
        f"{summary['train_seconds']:.1f} s of training"
    )
    print(
        f"  conditions: {conditions(optimizer=cfg.optimizer, lr=cfg.lr, batch=cfg.batch_size, schedule=cfg.schedule)}"
        f", augment {summary['augment']}, precision {summary['precision']}, 1 run"
    )
    return True


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
