"""The data of a training run: decoded into memory (the named datasets, small image folders) or streamed
(large or mixed-size image folders, packed shards), split, normalised, and made into this rank's loaders."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from ..data import InMemoryLoader, channel_stats, get_spec, load_dataset, parse_augment, split_validation
from ..data.kinds import STREAM_AUGMENT, data_kind
from ..data.preprocess import Preprocess
from ..data.transforms import EVAL_CROP_FRACTION
from ..errors import ConfigError
from .config import TrainConfig
from .runtime import Runtime

__all__ = ["TrainingData", "StreamedDataset", "choose_mode", "load_training_data"]


@dataclass
class TrainingData:
    """The loaders of a run and what the model and the run folder need to know about its data."""

    # InMemoryLoader, or a streaming ShardLoader / FolderStreamLoader: duck-typed alike, so Any
    train: Any
    test: Any
    val: Any
    classes: list[str]
    shape: tuple[int, int, int]  # what the model sees: C, H, W (after --image-size)
    mean: list[float]
    std: list[float]
    augment: str
    fingerprint: str
    dataset: Any  # cnnlab.data.Dataset (or a streamed one): name, source, verified, files, test labels
    mode: str = "memory"  # or "stream"
    mode_reason: str = ""
    train_images: torch.Tensor | None = None  # uint8, in memory mode (for models that prepare from data)
    bad_limits: tuple[float, float] = (0, 0)  # streamed: unreadable images allowed in the train and test splits
    preprocess: Preprocess | None = None  # how a file becomes a test input; recorded in model.json

    def describe(self) -> str:
        return self.dataset.describe()

    def bad_images(self, runtime: Runtime) -> list[dict]:
        """Every image that failed to decode, on any rank, once each."""
        local = getattr(self.train, "bad_images", []) + getattr(self.test, "bad_images", [])
        merged = {item["file"]: item for share in runtime.gather(local) for item in share}
        return list(merged.values())

    def check_bad_images(self, runtime: Runtime) -> None:
        """In a distributed run the ranks count their unreadable images apart: the limit holds for their sum,
        checked by every rank at once (at each checkpoint), so that all of them stop together."""
        if self.mode != "stream" or not runtime.distributed:
            return  # one process: the loaders check as they go
        counts = torch.tensor([float(self.train.bad_count), float(self.test.bad_count)])
        total_train, total_test = runtime.all_reduce(counts).tolist()
        self.train.check_bad_images(int(total_train), limit=self.bad_limits[0])
        self.test.check_bad_images(int(total_test), limit=self.bad_limits[1])

    def use_channels_last(self, channels_last: bool) -> None:
        """Every loader hands out batches in this layout from now on (the run's memory format, decided late)."""
        for loader in (self.train, self.test, self.val):
            if loader is not None:
                loader.use_channels_last(channels_last)

    def close(self) -> None:
        """Stop the streaming loaders' worker processes."""
        for loader in (self.train, self.test, self.val):
            getattr(loader, "close", lambda: None)()


@dataclass
class StreamedDataset:
    """What a run records of data it streams: never all in memory, so described by its file lists."""

    name: str
    source: str
    classes: list[str]
    counts: dict
    image_size: int
    files: list[dict]
    test_labels: torch.Tensor | None
    verified: None = None  # the user's own files: no publisher checksum

    def describe(self) -> str:
        return (
            f"{self.name}: {self.counts['train']:,} train / {self.counts['test']:,} test images from "
            f"{self.source}, streamed at {self.image_size}x{self.image_size} [your own files: no publisher "
            "checksum to verify against]"
        )


def _fingerprint(data, train_labels: torch.Tensor, val_labels: torch.Tensor | None) -> str:
    """Identifies the exact training data: the source files' sha256 (or, for an image folder, the decoded
    pixels) and the labels after subsetting and the validation split."""
    h = hashlib.sha256(json.dumps([f["sha256"] for f in data.files]).encode())  # not the paths: copies may move
    if data.decoded_by is not None:  # an image folder: its pixels, not publisher checksums, identify it
        h.update(data.train_images.numpy().tobytes())
    h.update(train_labels.numpy().tobytes())
    if val_labels is not None:
        h.update(val_labels.numpy().tobytes())
    return h.hexdigest()


def choose_mode(cfg: TrainConfig) -> tuple[str, str]:
    """("memory" | "stream", the reason to print) for the run's data."""
    kind = data_kind(cfg.dataset)
    if kind.shards:
        return "stream", "data mode stream: shards are always streamed"
    if not kind.image_folder:
        return "memory", f"data mode memory: {cfg.dataset} is decoded once into RAM"
    from ..data.stream import choose_data_mode, parse_bytes

    if cfg.data_dir is None:
        raise ConfigError(f"imagefolder needs --data-dir ROOT; {get_spec('imagefolder').how_to_get}")
    return choose_data_mode(cfg.data_dir, cfg.data_mode, cfg.image_size or None, parse_bytes(cfg.memory_budget))


def load_training_data(cfg: TrainConfig, runtime: Runtime, log: Callable[[str], None] = print) -> TrainingData:
    """Find and decode the dataset (or list it, to stream it), split it, compute the normalisation, and
    build this rank's loaders."""
    mode, reason = choose_mode(cfg)
    if mode == "stream":
        return _streamed_data(cfg, runtime, reason)
    if cfg.download and runtime.distributed:  # one download, by rank 0, before the others look
        if runtime.is_main:
            load_dataset(cfg.dataset, cfg.data_dir, download=True, log=log)
        runtime.barrier()
    data = load_dataset(
        cfg.dataset,
        cfg.data_dir,
        download=cfg.download,
        log=log,
        write_cache=runtime.is_main,
        image_size=cfg.image_size or None,
    )
    train_x, train_y = data.train_images, data.train_labels
    if cfg.train_subset:
        train_x, train_y = train_x[: cfg.train_subset], train_y[: cfg.train_subset]
    val_x = val_y = None
    if cfg.val_split:
        train_x, train_y, val_x, val_y = split_validation(train_x, train_y, cfg.val_split, seed=cfg.seed)
    mean, std = channel_stats(train_x)
    augment = data_kind(cfg.dataset).default_augment if cfg.augment == "auto" else cfg.augment
    c, h, w = data.shape
    resize = (cfg.image_size, cfg.image_size) if cfg.image_size and (cfg.image_size, cfg.image_size) != (h, w) else None
    common: dict[str, Any] = dict(
        mean=mean,
        std=std,
        device=runtime.device,
        channels_last=runtime.channels_last,
        rank=runtime.rank,
        world_size=runtime.world_size,
        resize=resize,
    )
    train = InMemoryLoader(
        train_x,
        train_y,
        cfg.batch_size,
        shuffle=True,
        drop_last=True,
        seed=cfg.seed + 1,
        augment=parse_augment(augment),
        **common,
    )
    if len(train) == 0:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is larger than the {len(train_y)} training images; lower --batch-size"
        )
    eval_batch = max(cfg.batch_size // runtime.world_size, 1024)
    test = InMemoryLoader(data.test_images, data.test_labels, eval_batch, **common)
    val = None if val_x is None else InMemoryLoader(val_x, cast(torch.Tensor, val_y), eval_batch, **common)
    shape = (c, *(resize or (h, w)))
    preprocess = (Preprocess.squash(*shape) if resize else data.preprocess).with_stats(mean, std)
    return TrainingData(
        train,
        test,
        val,
        list(data.classes),
        shape,
        mean,
        std,
        augment,
        _fingerprint(data, train_y, val_y),
        data,
        mode,
        reason,
        train_x,
        preprocess=preprocess,
    )


def _streamed_data(cfg: TrainConfig, runtime: Runtime, reason: str) -> TrainingData:
    """Loaders that decode per sample in worker processes: an image folder listed, or packed shards."""
    from ..data.shards import ShardLoader, ShardSource, open_shards
    from ..data.stream import (
        FolderStreamLoader,
        ImageFolderSource,
        StreamingLoader,
        open_image_folder,
        sample_channel_stats,
    )

    size = cfg.image_size or 224  # ImageNet's training crop
    if cfg.data_dir is None:
        raise ConfigError(f"{cfg.dataset} needs --data-dir; {get_spec(cfg.dataset).how_to_get}")
    shards = data_kind(cfg.dataset, "stream").shards
    source = open_shards(cfg.data_dir) if shards else open_image_folder(cfg.data_dir)
    if shards and (cfg.train_subset or cfg.val_split):
        raise ConfigError(
            "train_subset and val_split select images by index, which shards cannot; pack the "
            "subset you want with 'cnnlab data pack' instead"
        )
    if cfg.augment not in ("auto", "none"):
        raise ConfigError(
            f"augment {cfg.augment!r}: streamed data is augmented per sample (RandomResizedCrop and "
            "flip); leave out --augment"
        )
    mean, std = sample_channel_stats(source, size)  # an estimate from 256 training images
    common: dict[str, Any] = dict(
        image_size=size,
        mean=mean,
        std=std,
        workers=cfg.workers,
        rank=runtime.rank,
        world_size=runtime.world_size,
        device=runtime.device,
        channels_last=runtime.channels_last,
        max_bad_images=None if cfg.max_bad_images < 0 else cfg.max_bad_images,
    )
    eval_batch = max(cfg.batch_size // runtime.world_size, 256) * runtime.world_size
    train: StreamingLoader
    test: StreamingLoader
    val: StreamingLoader | None
    if shards:
        assert isinstance(source, ShardSource)
        extra: dict[str, Any] = {"shuffle_buffer": cfg.shuffle_buffer}
        train = ShardLoader(source, "train", cfg.batch_size, train=True, seed=cfg.seed + 1, **common, **extra)
        test = ShardLoader(source, "test", eval_batch, train=False, **common)
        val = None
        names = json.dumps([e["sha256"] for split in ("train", "test") for e in source.shards(split)])
        files = [
            {
                "file": str(source.root / "manifest.json"),
                "sha256": hashlib.sha256(names.encode()).hexdigest(),
                "status": "own files",
            }
        ]
        test_labels, train_labels = None, torch.zeros(0)
    else:
        assert isinstance(source, ImageFolderSource)
        indices = np.arange(source.count("train"))[: cfg.train_subset or None]
        val_idx = None
        if cfg.val_split:
            order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(cfg.seed)).numpy()
            n_val = int(round(len(indices) * cfg.val_split))
            indices, val_idx = indices[order[n_val:]], indices[order[:n_val]]
        train = FolderStreamLoader(
            source, "train", cfg.batch_size, train=True, seed=cfg.seed + 1, indices=indices, **common
        )
        test = FolderStreamLoader(source, "test", eval_batch, train=False, **common)
        val = (
            None
            if val_idx is None
            else FolderStreamLoader(source, "train", eval_batch, train=False, indices=val_idx, **common)
        )
        split = source.splits["train"]
        names = "\n".join(split.names[i] for i in indices)
        files = [
            {
                "file": str(source.root),
                "sha256": hashlib.sha256(names.encode()).hexdigest(),
                "status": "own files (sha256 of the training file list)",
            }
        ]
        test_labels, train_labels = torch.from_numpy(source.labels("test")), torch.from_numpy(split.labels[indices])
    if len(train) == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training split; lower --batch-size")
    limits = (train.max_bad_images, test.max_bad_images)
    if runtime.distributed:  # no rank stops alone (its peers would wait for it): the sum is checked at checkpoints
        for loader in (train, test, val):
            if loader is not None:
                loader.max_bad_images = float("inf")
    dataset = StreamedDataset(
        cfg.dataset,
        str(source.root),
        list(source.classes),
        {"train": source.count("train"), "test": source.count("test")},
        size,
        files,
        test_labels,
    )
    fingerprint = hashlib.sha256((files[0]["sha256"] + str(size)).encode() + train_labels.numpy().tobytes()).hexdigest()
    # evaluation decodes as torchvision's does: shorter side to size / 0.875, the centre size x size
    preprocess = Preprocess.centre_crop(source.channels, size, EVAL_CROP_FRACTION).with_stats(mean, std)
    return TrainingData(
        train,
        test,
        val,
        list(source.classes),
        (source.channels, size, size),
        mean,
        std,
        STREAM_AUGMENT,
        fingerprint,
        dataset,
        "stream",
        reason,
        bad_limits=limits,
        preprocess=preprocess,
    )
