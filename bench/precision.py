"""`--precision auto --channels-last auto` against the three settings it chooses among, measured in full epochs of
`cnnlab train` (fit): the lecture's convnet and resnet20 on CIFAR-10 (3x32x32), and a tiny model streaming a
224-pixel JPEG folder. For each model: img/s of the second epoch in fp32 NCHW, fp32 channels_last and bf16
channels_last, then with auto (its own model probe, or its cached answer for this model), the settings taking
turns over the repeats. Target: auto's rate within 10% of the best setting's (median over repeats).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

from common import conditions, no_data, shared_cifar10

from cnnlab.engine import TrainConfig, fit

SETTINGS = {
    "fp32 NCHW": ("fp32", "off"),
    "fp32 channels_last": ("fp32", "on"),
    "bf16 channels_last": ("bf16", "on"),
    "auto": ("auto", "auto"),
}


def _second_epoch(cfg: TrainConfig, run_dir: Path) -> tuple[float, str]:
    """img/s of the run's second epoch (training time only: the probe, before the first, is not in it), and
    what it trained in."""
    summary = fit(TrainConfig(**{**cfg.__dict__, "run_dir": str(run_dir)}), log=lambda m: None)
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    chosen = f"{summary['precision']} {'channels_last' if summary['channels_last'] else 'NCHW'}"
    return float(rows[1]["img_per_s"]), chosen


def measure(name: str, cfg: TrainConfig, repeats: int, tmp: Path) -> dict:
    rates = {k: [] for k in SETTINGS}
    chosen = set()
    for r in range(repeats):
        for label, (precision, channels_last) in SETTINGS.items():
            run_cfg = TrainConfig(**{**cfg.__dict__, "precision": precision, "channels_last": channels_last})
            rate, used = _second_epoch(run_cfg, tmp / f"{name}-{label.replace(' ', '_')}-{r}")
            rates[label].append(rate)
            if label == "auto":
                chosen.add(used)
    med = {k: statistics.median(v) for k, v in rates.items()}
    best = max((k for k in SETTINGS if k != "auto"), key=med.__getitem__)
    ok = med["auto"] >= 0.9 * med[best]
    parts = ", ".join(f"{k} {med[k]:,.0f}" for k in SETTINGS)
    print(
        f"precision {name}: img/s of epoch 2, median of {repeats}: {parts}; auto chose {', '.join(sorted(chosen))}, "
        f"{med['auto'] / med[best]:.2f}x the best setting ({best}) [{'PASS' if ok else 'FAIL'}]"
    )
    return {"ok": ok}


def main(repeats: int = 2, only: str | None = None) -> bool:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cifar = shared_cifar10()
        common = dict(epochs=2, batch_size=128, optimizer="sgd", lr=0.01, progress="none", eval_every=0, report=False)
        models = {}
        if cifar is not None:
            models["convnet"] = TrainConfig(
                model="convnet", dataset="cifar10", data_dir=str(cifar), train_subset=10_240, **common
            )
            models["resnet20"] = TrainConfig(
                model="resnet20", dataset="cifar10", data_dir=str(cifar), train_subset=2_560, **common
            )
        else:
            no_data("precision convnet / resnet20")
        from stream import SIZE, WORKERS, jpeg, textured, write_folder

        root = write_folder(tmp / "jpegs", 768, [jpeg(textured(500, 375, s)) for s in range(48)])
        models["stream224"] = TrainConfig(
            dataset="imagefolder",
            data_dir=str(root),
            data_mode="stream",
            model="cnn",
            model_args={"spec": "c8k8s8,g"},
            image_size=SIZE,
            workers=WORKERS,
            threads=1,
            **{**common, "batch_size": 32},
        )
        for name, cfg in models.items():
            if only is None or only == name:
                results.append(measure(name, cfg, repeats, tmp)["ok"])
    print(
        f"  conditions: {conditions(repeats=repeats)}; convnet 10,240 and resnet20 2,560 CIFAR-10 images an epoch, "
        "batch 128; stream224: 768 JPEGs 500x375 to 224x224, batch 32, 2 workers, 1 main thread; shared machine: "
        "timings are noisy"
    )
    return bool(results) and all(results) and cifar is not None


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=("convnet", "resnet20", "stream224"))
    args = parser.parse_args()
    raise SystemExit(0 if main(args.repeats, args.only) else 1)
