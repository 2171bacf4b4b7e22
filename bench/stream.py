"""Streaming an ImageNet-like JPEG folder: cnnlab's stream loader against the conventional per-sample pipeline,
JPEG decoders side by side, and the memory of the whole process tree as the dataset grows tenfold.

- train (the headline): `cnnlab train` (fit, its default precision and memory format) streaming the folder with
  a tiny model, against the conventional DataLoader + Pillow training loop and the stream loader alone feeding
  that same loop; steady-state epochs (2-4) of each repeat, medians. Targets: >= 1.5x the conventional loop,
  and >= 80% of the loader alone. `python bench/stream.py --only train` runs this part alone.

- speed: 500x375 textured JPEGs to 224x224 RandomResizedCrop + flip, through SGD steps of a tiny convnet so
  that the data path is what is timed; 2 workers each. Conventional: torch DataLoader, PIL open,
  convert("RGB"), crop, resize, flip, to float tensor and normalise per sample in the worker, float batches.
  cnnlab: FolderStreamLoader (uint8 batches, normalised in the batch). Target: >= 1.5x.
- decode: ms per image for Pillow (full decode, crop, resize), cnnlab's decode_crop (region decoding of the
  crop, torch's uint8 resize, draft mode where it applies) and simplejpeg (libjpeg-turbo bindings) if it is
  installed, on 500x375 and 2000x1500 JPEGs, and each stage alone.
- memory: peak RSS summed over the process tree (main + workers: sampled every 20 ms, and VmHWM at the end)
  for one epoch over N and 10 N files. Target: within 25% + 64 MB.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from common import conditions, stats, train_on
from PIL import Image

from cnnlab.data import transforms
from cnnlab.data.stream import FolderStreamLoader, open_image_folder
from cnnlab.data.transforms import _jpeg_region, decode_crop, random_resized_crop_box, resize, sample_rng

SIZE, BATCH, WORKERS = 224, 32, 2
DECODER = (
    f"region (_jpeg_region, libjpeg-turbo {_jpeg_region.LIBJPEG_TURBO_VERSION_NUMBER})"
    if _jpeg_region
    else "whole image (the _jpeg_region extension is not built)"
)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def textured(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (
        np.stack(
            [
                np.sin(x / (5 + seed % 7) + y / 13) * 60,
                np.cos(x / 11 - y / (3 + seed % 5)) * 60,
                ((x * y + seed) % 255) * 0.3,
            ],
            axis=-1,
        )
        + 128
    )
    return (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_folder(root: Path, n: int, pool: list[bytes], classes: int = 10) -> Path:
    """n training files (copies from a pool of distinct JPEGs) and a small test split."""
    for split, count in (("train", n), ("test", classes)):
        for i in range(count):
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:06d}.jpg").write_bytes(pool[i % len(pool)])
    return root


class Conventional(torch.utils.data.Dataset):
    """The usual per-sample pipeline (torchvision's ImageFolder + transforms, written out with PIL)."""

    def __init__(self, root: Path):
        self.files = sorted((root / "train").glob("*/*.jpg"))
        self.labels = [int(p.parent.name[1:]) for p in self.files]
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)
        self.rng = np.random.default_rng()

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with open(self.files[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        box = random_resized_crop_box(*img.size, self.rng)
        img = img.crop(box).resize((SIZE, SIZE), Image.BILINEAR)
        if self.rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous().float().div(255)
        return x.sub_(self.mean).div_(self.std), self.labels[i]


def tiny_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    )


def bench_speed(root: Path, repeats: int) -> dict[str, list[float]]:
    """img/s of each pipeline per repeat: "ours", "theirs" and, where the region decoder is built, "whole" (ours
    with whole-image JPEG decoding: what the region decoder is worth)."""
    source = open_image_folder(root)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loaders = {
        "theirs": torch.utils.data.DataLoader(
            Conventional(root),
            batch_size=BATCH,
            shuffle=True,
            drop_last=True,
            num_workers=WORKERS,
            persistent_workers=True,
        )
    }
    if transforms._jpeg_region is not None:
        region, transforms._jpeg_region = transforms._jpeg_region, None  # the workers fork without it
        try:
            loaders["whole"] = FolderStreamLoader(
                source, "train", BATCH, image_size=SIZE, mean=MEAN, std=STD, workers=WORKERS
            )
            train_on(model, opt, loaders["whole"])
        finally:
            transforms._jpeg_region = region
    loaders["ours"] = FolderStreamLoader(source, "train", BATCH, image_size=SIZE, mean=MEAN, std=STD, workers=WORKERS)
    for batches in loaders.values():  # start every pipeline's workers, once
        train_on(model, opt, batches)
    rates = {name: [] for name in loaders}
    for _ in range(repeats):  # take turns, so that load from other users of the machine hits all alike
        for name, batches in loaders.items():
            start = time.perf_counter()
            n = train_on(model, opt, batches)
            rates[name].append(n / (time.perf_counter() - start))
    for name, batches in loaders.items():
        if name != "theirs":
            batches.close()
    return rates


TRAIN_EPOCHS = 4  # the first is warm-up (workers start, the precision probe, kernels); 2-4 are steady state
TRAIN_SPEC = "c8k8s8,g"  # the tiny model as `cnnlab train --model cnn` builds it: conv 8x8/8, pool, linear


def spec_model() -> nn.Module:
    """The very model `cnnlab train` trains below, for the two plain loops."""
    from cnnlab.models import create_model

    return create_model("cnn", spec=TRAIN_SPEC, num_classes=10)


def _steady(rates: list[float]) -> list[float]:
    return rates[1:]


def _conventional_epochs(root: Path, epochs: int) -> list[float]:
    """img/s of each epoch of the conventional training loop (DataLoader + Pillow, tiny model, SGD)."""
    model = spec_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(
        Conventional(root), batch_size=BATCH, shuffle=True, drop_last=True, num_workers=WORKERS, persistent_workers=True
    )
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        n = train_on(model, opt, loader)
        rates.append(n / (time.perf_counter() - start))
    return rates


def _loader_epochs(root: Path, epochs: int) -> tuple[list[float], float]:
    """img/s of each epoch of the stream loader alone, feeding the same plain training loop; and the training
    process's CPU milliseconds per batch over epochs 2 on."""
    model = spec_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = FolderStreamLoader(
        open_image_folder(root), "train", BATCH, image_size=SIZE, mean=MEAN, std=STD, workers=WORKERS
    )
    rates = []
    try:
        for epoch in range(epochs):
            if epoch == 1:
                cpu = time.process_time()  # this process's CPU time (not the workers'), steady state
            start = time.perf_counter()
            n = train_on(model, opt, loader)
            rates.append(n / (time.perf_counter() - start))
        steps = (epochs - 1) * len(loader)
        return rates, (time.process_time() - cpu) / steps * 1e3
    finally:
        loader.close()


def _train_epochs(root: Path, run_dir: Path, epochs: int) -> tuple[list[float], dict, float]:
    """img/s of each epoch of `cnnlab train` (fit) streaming the folder, as metrics.csv reports them (training
    time only, no evaluation: --eval-every 0), with the defaults for precision and memory format; and its
    summary."""
    import csv

    from cnnlab.engine import TrainConfig, fit

    cfg = TrainConfig(
        dataset="imagefolder",
        data_dir=str(root),
        data_mode="stream",
        model="cnn",
        model_args={"spec": TRAIN_SPEC},
        image_size=SIZE,
        epochs=epochs,
        batch_size=BATCH,
        workers=WORKERS,
        threads=1,
        optimizer="sgd",
        lr=0.01,
        progress="none",
        eval_every=0,
        report=False,
        run_dir=str(run_dir),
    )
    per_epoch = len(open_image_folder(root).splits["train"]) // BATCH
    marks = {}

    def mark(state) -> None:  # the training process's CPU time at the end of epoch 1 and of the last
        if state.step in (per_epoch, epochs * per_epoch):
            marks[state.step] = time.process_time()

    summary = fit(cfg, log=lambda m: None, callbacks=[mark])
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    cpu_ms = (marks[epochs * per_epoch] - marks[per_epoch]) / ((epochs - 1) * per_epoch) * 1e3
    return [float(r["img_per_s"]) for r in rows], summary, cpu_ms


def bench_train(root: Path, repeats: int, tmp: Path) -> dict[str, list[float]]:
    """Steady-state epochs (2..TRAIN_EPOCHS) of the three, each repeat in turn so that load from other users
    of the machine hits all alike: "train" (cnnlab train), "loader" (the stream loader alone), "theirs"."""
    out = {"train": [], "loader": [], "theirs": [], "train_cpu_ms": [], "loader_cpu_ms": []}
    settings = set()
    for r in range(repeats):
        out["theirs"] += _steady(_conventional_epochs(root, TRAIN_EPOCHS))
        rates, cpu_ms = _loader_epochs(root, TRAIN_EPOCHS)
        out["loader"] += _steady(rates)
        out["loader_cpu_ms"].append(cpu_ms)
        rates, summary, cpu_ms = _train_epochs(root, tmp / f"train{r}", TRAIN_EPOCHS)
        out["train"] += _steady(rates)
        out["train_cpu_ms"].append(cpu_ms)
        settings.add(
            f"{summary['precision']} {'channels_last' if summary['channels_last'] else 'NCHW'} "
            f"({summary['precision_reason']}; {summary['channels_last_reason']})"
        )
    out["settings"], out["runs"] = sorted(settings), repeats
    return out


def report_train(rates: dict, files: int) -> bool:
    """Print the whole-path figures; True when both targets are met."""
    med = {k: statistics.median(rates[k]) for k in ("train", "loader", "theirs")}
    vs_theirs, vs_loader = med["train"] / med["theirs"], med["train"] / med["loader"]
    ok = vs_theirs >= 1.5 and vs_loader >= 0.8

    def rate(name):
        values = rates[name]
        return f"min {min(values):,.0f} / median {statistics.median(values):,.0f} img/s"

    print(
        f"cnnlab train, streaming: {rate('train')}; conventional DataLoader + Pillow training loop: "
        f"{rate('theirs')}; ratio {vs_theirs:.2f}x (target >= 1.5x); the stream loader alone (same loop as the "
        f"conventional one): {rate('loader')}, cnnlab train at {vs_loader:.0%} of it (target >= 80%) "
        f"[{'PASS' if ok else 'FAIL'}]"
    )
    print(
        f"  the training process's own CPU time per batch (steady state, workers not counted; median of "
        f"{rates['runs']} runs): cnnlab train {statistics.median(rates['train_cpu_ms']):.1f} ms, the plain loop over "
        f"the stream loader {statistics.median(rates['loader_cpu_ms']):.1f} ms"
    )
    print(
        f"  over {len(rates['train'])} steady-state epochs each (epochs 2-{TRAIN_EPOCHS} of {rates['runs']} runs); "
        f"cnnlab train chose: {'; '.join(rates['settings'])}"
    )
    print(
        f"  conditions: {conditions(workers=WORKERS, batch=BATCH, images=files, jpeg='500x375 q90', crop=SIZE, model=f'cnn spec {TRAIN_SPEC} in all three, SGD', main_threads=1)}; cnnlab decoder: {DECODER}"
        f"; load average {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores): on a shared machine "
        "timings are noisy"
    )
    return ok


def bench_decode(repeats: int) -> dict[str, dict[str, list[float]]]:
    try:
        import simplejpeg
    except ImportError:
        simplejpeg = None
    out = {}
    for label, (w, h) in (("500x375", (500, 375)), ("2000x1500", (2000, 1500))):
        data = [jpeg(textured(w, h, s)) for s in range(4)]

        def pillow(d, i):
            img = Image.open(io.BytesIO(d)).convert("RGB")
            box = random_resized_crop_box(*img.size, sample_rng(0, 0, i))
            return img.crop(box).resize((SIZE, SIZE), Image.BILINEAR)

        def cnnlab_eval(d, i):
            return decode_crop(d, "x.jpg", SIZE, "RGB")

        def cnnlab_train(d, i):
            return decode_crop(d, "x.jpg", SIZE, "RGB", rng=sample_rng(0, 0, i))

        def turbo(d, i):
            pixels = simplejpeg.decode_jpeg(d, colorspace="RGB")
            box = random_resized_crop_box(pixels.shape[1], pixels.shape[0], sample_rng(0, 0, i))
            return Image.fromarray(pixels).crop(box).resize((SIZE, SIZE), Image.BILINEAR)

        def decode_only(d, i):
            img = Image.open(io.BytesIO(d))
            img.load()
            return img

        decoded = decode_only(data[0], 0)
        box = random_resized_crop_box(*decoded.size, sample_rng(0, 0, 0))
        small = np.asarray(decoded.crop(box).resize((SIZE, SIZE), Image.BILINEAR))
        mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

        def stage_resize(d, i):
            return decoded.crop(box).resize((SIZE, SIZE), Image.BILINEAR)

        def stage_float(d, i):
            x = torch.from_numpy(small.copy()).permute(2, 0, 1).contiguous().float().div(255)
            return x.sub_(mean).div_(std)

        def stage_torch_resize(d, i):
            return resize(pixels[box[1] : box[3], box[0] : box[2]], SIZE, SIZE)

        pixels = np.array(decoded.convert("RGB"))
        methods = {
            "stage: Pillow decode only": decode_only,
            "stage: crop+resize (Pillow)": stage_resize,
            "stage: crop+resize (torch uint8, cnnlab)": stage_torch_resize,
            "stage: to float + normalise": stage_float,
            "pillow decode+crop+resize": pillow,
            "cnnlab decode_crop (train)": cnnlab_train,
            "cnnlab decode_crop (eval)": cnnlab_eval,
        }
        if _jpeg_region is not None:

            def region_only(d, i):
                width, height = Image.open(io.BytesIO(d)).size
                return _jpeg_region.decode_region(
                    d, 1, *random_resized_crop_box(width, height, sample_rng(0, 0, i)), False
                )

            methods["stage: region decode only (cnnlab, training crop)"] = region_only
        if simplejpeg is not None:
            methods["stage: simplejpeg decode only"] = lambda d, i: simplejpeg.decode_jpeg(d, colorspace="RGB")
            methods["simplejpeg decode+crop+resize"] = turbo
        n = 40 if w == 500 else 8
        times = {k: [] for k in methods}
        for _ in range(repeats):
            for name, fn in methods.items():
                start = time.perf_counter()
                for i in range(n):
                    fn(data[i % len(data)], i)
                times[name].append((time.perf_counter() - start) / n * 1e3)
        out[label] = times
    return out


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_child(root: str) -> None:
    """One epoch of training over ROOT in this fresh process; prints the tree's peak memory as JSON."""
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], sum(_status_kb(p, "VmRSS") for p in _tree(os.getpid())))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    source = open_image_folder(root)
    loader = FolderStreamLoader(source, "train", BATCH, image_size=SIZE, mean=MEAN, std=STD, workers=WORKERS)
    model = tiny_model()
    train_on(model, torch.optim.SGD(model.parameters(), lr=0.01), loader)
    hwm = sum(_status_kb(p, "VmHWM") for p in _tree(os.getpid()))  # the workers are still alive (persistent)
    done.set()
    print(json.dumps({"sampled_rss_kb": peak[0], "vmhwm_kb": hwm, "files": source.count("train")}))


def bench_memory(tmp: Path, pool: list[bytes], n: int) -> dict[int, dict]:
    out = {}
    for count in (n, 10 * n):
        root = write_folder(tmp / f"mem{count}", count, pool)
        result = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(root)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        out[count] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def main(repeats: int = 5, files: int = 768, memory_files: int = 200, only: str | None = None) -> bool:
    torch.set_num_threads(1)  # the two workers take the other cores
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pool = [jpeg(textured(500, 375, s)) for s in range(48)]
        root = write_folder(tmp / "speed", files, pool)
        train_ok = report_train(bench_train(root, max(repeats // 2, 1), tmp), files)
        if only == "train":
            return train_ok
        rates = bench_speed(root, repeats)
        ours, theirs = rates["ours"], rates["theirs"]
        ratio = statistics.median(ours) / statistics.median(theirs)
        speed_ok = ratio >= 1.5
        print(
            f"stream loader: {stats(ours)} img/s; conventional DataLoader: {stats(theirs)} img/s; "
            f"ratio {ratio:.2f}x (target >= 1.5x) [{'PASS' if speed_ok else 'FAIL'}]"
        )
        if "whole" in rates:
            print(
                f"  stream loader decoding whole JPEGs instead of the crop's region: {stats(rates['whole'])} img/s, "
                f"{statistics.median(rates['whole']) / statistics.median(theirs):.2f}x the conventional pipeline"
            )
        print(
            f"  conditions: {conditions(workers=WORKERS, batch=BATCH, images=files, jpeg='500x375 q90', crop=SIZE, model='conv8x8/8 + linear, SGD', main_threads=1)}; cnnlab decoder: {DECODER}"
            "; shared machine: timings are noisy"
        )
        for label, times in bench_decode(repeats).items():
            parts = "; ".join(f"{k} {min(v):.2f} / {statistics.median(v):.2f}" for k, v in times.items())
            print(f"decode {label} -> {SIZE}x{SIZE}, ms per image min / median over {repeats} repeats: {parts}")
        memory = bench_memory(tmp, pool, memory_files)
        small, large = memory[memory_files], memory[10 * memory_files]
        mb = {k: {m: v[m] / 1024 for m in ("sampled_rss_kb", "vmhwm_kb")} for k, v in memory.items()}
        limit = 1.25 * mb[memory_files]["sampled_rss_kb"] + 64
        memory_ok = mb[10 * memory_files]["sampled_rss_kb"] <= limit
        print(
            f"memory: peak RSS of main + {WORKERS} workers over one epoch: {small['files']:,} files "
            f"{mb[memory_files]['sampled_rss_kb']:.0f} MB (sum of VmHWM {mb[memory_files]['vmhwm_kb']:.0f} MB), "
            f"{large['files']:,} files {mb[10 * memory_files]['sampled_rss_kb']:.0f} MB (sum of VmHWM "
            f"{mb[10 * memory_files]['vmhwm_kb']:.0f} MB); limit {limit:.0f} MB (25% + 64 MB) "
            f"[{'PASS' if memory_ok else 'FAIL'}]"
        )
    return train_ok and speed_ok and memory_ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-child")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--files", type=int, default=768)
    parser.add_argument(
        "--only",
        choices=("train",),
        help="train: only cnnlab train against the conventional training loop and the loader alone",
    )
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
    else:
        raise SystemExit(0 if main(args.repeats, args.files, only=args.only) else 1)
