"""Data-parallel training on this CPU: resnet20 img/s with 2 ranks x 1 thread (torchrun --standalone, gloo; each
rank takes 64 images of a global batch of 128) against 1 process x 2 threads (batch 128), interleaved, min/median
over repeats; 1 process x 1 thread runs beside them as a reference, to tell what threads and what ranks bring.

Both arms are `cnnlab.fit` with the same config: CIFAR-10 (a training subset) where the shared copy is found,
else the synthetic CIFAR-shaped dataset. The figure is the img/s of epoch 2 (start-up and warm-up excluded); a
callback stops each run at the first step of epoch 3, before the final test evaluation, which is not measured.
On a machine with 2 cores both arms share the same two cores: the ratio then weighs gloo's gradient all-reduce
(and the per-step agreement on stops and NaNs) against intra-op threading, not a speed-up from more hardware. On a
loaded machine a 2-thread process can be far slower than a 1-thread one (OpenMP threads wait for each other
whenever one is descheduled): the reference arm shows it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import conditions, shared_cifar10, stats

from cnnlab import TrainConfig, fit
from cnnlab.training.run_folder import read_metrics
from cnnlab.training.runtime import pick_channels_last, pick_precision
from cnnlab.training.trainer import TrainingInterrupted

MODEL = "resnet20"
BATCH = 128  # global: 64 per rank with 2 ranks
IMAGES = 1920  # 15 steps per epoch
REPEATS = 3
HERE = Path(__file__).resolve()


def worker(config_json: str) -> int:
    """One run (one rank under torchrun): train until the first step of epoch 3, so epoch 2's row is written."""
    cfg = TrainConfig(**json.loads(config_json))
    steps_per_epoch = cfg.train_subset // cfg.batch_size

    def stop_in_epoch_3(state):
        if state.step > 2 * steps_per_epoch:
            state.stop_requested = True

    try:
        fit(cfg, callbacks=[stop_in_epoch_3], log=lambda message: None)
    except TrainingInterrupted:
        pass  # the stop asked for above
    return 0


ARMS = {"1x2": (1, 2), "2x1": (2, 1), "1x1": (1, 1)}  # processes x threads each
LABELS = {
    "1x2": f"1 process x 2 threads, batch {BATCH}",
    "2x1": f"2 ranks x 1 thread (gloo), {BATCH // 2} per rank",
    "1x1": f"1 process x 1 thread, batch {BATCH} (reference)",
}


def run_arm(ranks: int, cfg: dict, env: dict) -> float:
    """img/s of epoch 2 of one run: `ranks` processes under torchrun, or one plain process."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    result = subprocess.run(
        [sys.executable, *launcher, str(HERE), "--worker", json.dumps(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{ranks}-rank run failed (exit code {result.returncode}): "
            f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}"
        )
    rows = [r for r in read_metrics(Path(cfg["run_dir"]) / "metrics.csv") if r["epoch"] == 2]
    if not rows:
        raise RuntimeError(f"{cfg['run_dir']}: no epoch-2 row in metrics.csv")
    return rows[0]["img_per_s"]


def main(repeats: int = REPEATS) -> bool:
    data_dir = shared_cifar10()
    dataset = {"dataset": "cifar10", "data_dir": str(data_dir)} if data_dir else {"dataset": "synthetic-cifar"}
    data_note = (
        f"CIFAR-10 from {data_dir}, first {IMAGES:,} training images"
        if data_dir
        else f"SYNTHETIC CIFAR-shaped data (no shared CIFAR-10 copy found), first {IMAGES:,} images"
    )
    # cnnlab's own choice for one process at 2 threads, pinned for both arms so that they compute alike
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    precision, why = pick_precision("auto", torch.device("cpu"))
    channels_last, _ = pick_channels_last("auto", torch.device("cpu"), precision)
    torch.set_num_threads(threads)
    rates: dict[str, list[float]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="cnnlab-ddp-bench-") as tmp:
        src = str(HERE.parents[1] / "src")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
            "CNNLAB_CACHE": os.environ.get("CNNLAB_CACHE") or f"{tmp}/cache",
        }
        for r in range(repeats):
            order = list(ARMS)[r % 3 :] + list(ARMS)[: r % 3]  # rotate the order: load drifts hit every arm
            for arm in order:
                ranks, threads_each = ARMS[arm]
                cfg = dict(
                    model=MODEL,
                    train_subset=IMAGES,
                    batch_size=BATCH,
                    epochs=3,
                    eval_every=0,
                    progress="none",
                    report=False,
                    precision=precision,
                    channels_last="on" if channels_last else "off",
                    threads=threads_each,
                    run_dir=f"{tmp}/run-{r}-{arm}",
                    **dataset,
                )
                try:
                    rates[arm].append(run_arm(ranks, cfg, env))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    print(f"ddp: FAILED, nothing measured: {exc}")
                    return False
    width = max(map(len, LABELS.values()))
    for arm, values in rates.items():
        print(f"ddp {MODEL} {LABELS[arm]:<{width}}: {stats(values)} img/s")
    med = {arm: statistics.median(values) for arm, values in rates.items()}
    print(
        f"  ratio 2 ranks x 1 thread / 1 process x 2 threads = {med['2x1'] / med['1x2']:.2f}x (medians; best runs: "
        f"{max(rates['2x1']) / max(rates['1x2']):.2f}x); both arms use the same {os.cpu_count()} cores: this weighs "
        "data parallelism over gloo against intra-op threads, not more hardware"
    )
    print(
        f"  reference: 1 process x 2 threads / 1 process x 1 thread = {med['1x2'] / med['1x1']:.2f}x; "
        f"2 ranks / 1 process x 1 thread = {med['2x1'] / med['1x1']:.2f}x"
    )
    print(
        f"  conditions: {conditions(batch=BATCH, images_per_epoch=IMAGES, repeats=repeats)}, precision "
        f"{precision} ({why}), {'channels_last' if channels_last else 'NCHW'} (pinned for both arms); data: "
        f"{data_note}; img/s of epoch 2 from metrics.csv; the machine is shared with other jobs, so the figures "
        "are noisy"
    )
    return True


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        raise SystemExit(worker(sys.argv[2]))
    raise SystemExit(0 if main() else 1)
