"""Data beyond memory: image folders decoded per sample in DataLoader workers.

The loaders here have InMemoryLoader's interface (global batch size split over `world_size` ranks, `epoch`,
`position`, `state_dict`), but the file list is all they hold: workers decode, crop and flip each image
(transforms.py), batches travel as uint8 (N, C, H, W), and normalisation happens on the device.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..errors import ConfigError, DatasetError, ImageError
from .imagefolder import image_folder_classes, image_folder_files, split_of
from .images import open_encoded, parse_bytes, read_image_file
from .transforms import GRAY_MODES, ImageTransform

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "BAD_IMAGE_FRACTION",
    "TooManyBadImages",
    "ImageFolderSource",
    "open_image_folder",
    "choose_data_mode",
    "parse_bytes",
    "StreamingLoader",
    "FolderStreamLoader",
    "sample_channel_stats",
]

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes of decoded uint8 pixels (train + test) that auto keeps in RAM
BAD_IMAGE_FRACTION = 0.001  # default max_bad_images: 0.1% of the split, at least 1
PREFETCH_FACTOR = 2  # batches each DataLoader worker works ahead


class TooManyBadImages(DatasetError):
    """More unreadable images than max_bad_images: raised by the loader before it yields the next batch."""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


class _StringTable:
    """Many strings as one byte buffer + offsets: workers read them without touching a Python object per
    file, so copy-on-write pages stay shared (a list of 1.3M str grows every worker's memory as it is read)."""

    def __init__(self, strings: Sequence[str]):
        encoded = [s.encode() for s in strings]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._data[self._offsets[i] : self._offsets[i + 1]].tobytes().decode()


@dataclass
class _FolderSplit:
    names: _StringTable  # paths relative to the root
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageFolderSource:
    """An image folder listed, not decoded: classes, per-split file lists and labels, and the colour mode."""

    root: Path
    classes: list[str]
    splits: dict[str, _FolderSplit]  # "train", "test"
    mode: str  # "RGB", or "L" when every sampled image is greyscale

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def count(self, split: str) -> int:
        return len(self.splits[split])

    def labels(self, split: str) -> np.ndarray:
        return self.splits[split].labels

    def encoded_samples(self, split: str, n: int) -> Iterator[tuple[str, bytes | None, int]]:
        """(file, bytes or None if unreadable, index) of `n` files spread evenly over the split."""
        names = self.splits[split].names
        for i in np.unique(np.linspace(0, len(names) - 1, min(n, len(names))).round().astype(int)):
            name = str(self.root / names[i])
            try:
                data = read_image_file(name)
            except ImageError:
                data = None
            yield name, data, int(i)


def _header(path: Path) -> tuple[tuple[int, int], str] | None:
    """(size, mode) from the file header without decoding pixels; None when the header is unreadable or the
    file breaks a limit (images.Limits)."""
    try:
        im = open_encoded(read_image_file(path), path)
        return im.size, im.mode
    except Exception:
        return None


def open_image_folder(root: str | Path, mode: str | None = None, sample: int = 256) -> ImageFolderSource:
    """List ROOT/train/<class>/* and ROOT/test|val/<class>/*. The colour mode is `mode`, else "L" when the
    headers of `sample` files spread evenly over the training split are all greyscale, else "RGB"."""
    root = Path(root)
    classes = image_folder_classes(root)
    names: dict[str, list[str]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    index = {c: i for i, c in enumerate(classes)}
    for path in image_folder_files(root):
        split, class_name = split_of(root, path)
        names[split].append(str(path.relative_to(root)))
        labels[split].append(index[class_name])
    if not names["test"]:
        raise DatasetError(f"{root}: the test split holds no images")
    if mode is None:
        train = names["train"]
        picks = np.unique(np.linspace(0, len(train) - 1, min(sample, len(train))).round().astype(int))
        headers = [h for h in (_header(root / train[i]) for i in picks) if h is not None]
        mode = "L" if headers and all(m in GRAY_MODES for _, m in headers) else "RGB"
    splits = {s: _FolderSplit(_StringTable(names[s]), np.asarray(labels[s], dtype=np.int64)) for s in names}
    return ImageFolderSource(root, classes, splits, mode)


def choose_data_mode(
    root: str | Path, requested: str = "auto", image_size: int | None = None, budget: int = DEFAULT_MEMORY_BUDGET
) -> tuple[str, str]:
    """Decide between "memory" (decode everything once) and "stream" (decode per sample); returns the choice
    and a one-line reason to print. auto keeps memory mode when all images share one size, every header is
    readable and the decoded train + test pixels fit in `budget` bytes (default 2 GiB, --memory-budget)."""
    if requested not in ("auto", "memory", "stream"):
        raise ConfigError(f"data mode {requested!r}: choose auto, memory or stream")
    if requested != "auto":
        how = (
            "every image decoded into RAM once"
            if requested == "memory"
            else "images decoded per sample in the loader's workers"
        )
        return requested, f"data mode {requested} (as asked): {how}"
    root = Path(root)
    files = image_folder_files(root)
    n = len(files)
    sizes: set[tuple[int, int]] = set()
    gray = True
    for path in files:
        header = _header(path)
        if header is None:
            return "stream", (
                f"data mode stream: {path} has no readable header; stream mode skips bad images "
                "(up to --max-bad-images), memory mode refuses them"
            )
        size, mode = header
        sizes.add(size)
        gray &= mode in GRAY_MODES
        if image_size is None and len(sizes) > 1:
            shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
            return "stream", f"data mode stream: the images differ in size ({shown}, ...); memory mode needs one size"
        w, h = (image_size, image_size) if image_size else next(iter(sizes))
        if n * w * h > budget:  # even at one channel the decoded split would not fit
            return "stream", (
                f"data mode stream: {n:,} decoded images of {w}x{h} need at least {_human(n * w * h)}, "
                f"over the {_human(budget)} memory budget (--memory-budget)"
            )
    if image_size is not None and len(sizes) > 1:
        return "stream", (
            f"data mode stream: the images differ in size ({len(sizes)} sizes); streaming crops "
            f"them to {image_size}x{image_size} per sample"
        )
    c = 1 if gray else 3
    w, h = (image_size, image_size) if image_size else next(iter(sizes))
    need = n * c * w * h
    if need > budget:
        return "stream", (
            f"data mode stream: {n:,} decoded images of {c}x{h}x{w} need {_human(need)}, over the "
            f"{_human(budget)} memory budget (--memory-budget)"
        )
    return "memory", (
        f"data mode memory: {n:,} images of {c}x{h}x{w} decode to {_human(need)}, within the "
        f"{_human(budget)} memory budget (--memory-budget)"
    )


# What a worker hands the main process for one batch: uint8 pixels (n, C, H, W), or the index of the shared
# slot that holds them, or None when every image of the batch failed; int64 labels; [(name, error)] for
# unreadable images; and a fatal error message or None.
_Item = tuple  # (torch.Tensor | int | None, torch.Tensor, list[tuple[str, str]], str | None)


def assemble_batch(
    pixels: Sequence[np.ndarray | None], labels: Sequence[int], fill: bool, out: torch.Tensor | None = None
) -> tuple:
    """Stack decoded samples (C, H, W) into (n, C, H, W) uint8 (into `out[:n]` when given) and int64 labels. A
    failed sample (None) is replaced by a copy of the nearest readable sample of the batch, previous first
    (fill: training batches keep their shape), or dropped (evaluation counts each readable image once). None
    when no sample is readable."""
    good = [i for i, p in enumerate(pixels) if p is not None]
    if not good:
        return None, torch.zeros(0, dtype=torch.int64)
    if fill:
        keep = [max((g for g in good if g <= i), default=good[0]) for i in range(len(pixels))]
    else:
        keep = good
    kept = cast(list[np.ndarray], [pixels[i] for i in keep])  # keep holds readable samples only
    if out is None:
        x = torch.from_numpy(np.stack(kept))
    else:
        x = out[: len(keep)]
        np.stack(kept, out=x.numpy())
    y = torch.as_tensor([labels[i] for i in keep], dtype=torch.int64)
    return x, y


class _SharedBatchSlots:
    """Batch buffers in shared memory, reused round robin: a worker writes a batch into the slot its task names
    and returns the slot's number, the main process normalises from it (a copy) before it asks for more.

    Why: a fresh shared-memory tensor per batch (what DataLoader does with returned tensors) is a new mapping
    on both sides, and each of its pages faults once in the worker that writes it and once in the main process
    that reads it. On the 2-core VM of bench/stream.py that was about 0.4 ms of CPU per 224x224 image, of 3.

    Safe because DataLoader keeps at most prefetch_factor x workers tasks in flight and dispatches the next one
    just before it hands a batch over: at most that many + 1 slots are in use, and there are 2 more.
    """

    def __init__(self, in_flight: int, batch_shape: tuple[int, ...]):
        self.count = in_flight + 2
        self.buffers = torch.zeros((self.count, *batch_shape), dtype=torch.uint8).share_memory_()
        self._next = 0

    def take(self) -> int:
        """The slot for the next task (main process, in task order)."""
        slot, self._next = self._next, (self._next + 1) % self.count
        return slot

    def batch(self, slot: int, n: int, hwc: bool = False) -> torch.Tensor:
        """The first n images of a slot: (n, C, H, W), or (n, H, W, C) for batches written channels-last."""
        buffer = self.buffers[slot]
        if hwc:
            b, c, h, w = buffer.shape
            buffer = buffer.view(b, h, w, c)
        return buffer[:n]


def _identity(item):
    return item


class StreamingLoader:
    """What the folder and shard loaders share: the global batch split over ranks, the transfer of uint8
    batches and their normalisation on the device, the record of bad images and its threshold."""

    def __init__(
        self,
        batch_size: int,
        *,
        mean,
        std,
        channels: int,
        image_size: int,
        split_size: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        max_bad_images: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        if batch_size % world_size:
            raise ConfigError(
                f"batch size {batch_size} cannot be split evenly over {world_size} processes; "
                f"choose a multiple of {world_size} (e.g. {batch_size - batch_size % world_size or world_size})"
            )
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.local_batch = batch_size // world_size
        self.workers = workers
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.image_size = image_size
        # float: a distributed run sets it to inf and checks the ranks' sum instead
        self.max_bad_images: float = (
            max(1, math.ceil(BAD_IMAGE_FRACTION * split_size)) if max_bad_images is None else int(max_bad_images)
        )
        self.epoch = 0  # epochs completed
        self.position = 0  # batches of the current epoch already handed out
        self._bad: dict[str, str] = {}
        self._slots: _SharedBatchSlots | None = None  # set by loaders whose workers return batches through them
        self._hwc = False  # whether the workers write (N, H, W, C) batches (the folder loader, for channels_last)
        c = channels
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, c, 1, 1)
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, c, 1, 1)
        self._scale = (1.0 / (255.0 * std_t)).to(self.device)  # (x / 255 - mean) / std as one multiply-add
        self._shift = (-mean_t / std_t).to(self.device)

    # -- bad images -------------------------------------------------------------------------------------
    @property
    def bad_images(self) -> list[dict]:
        """Every image that failed to decode so far, once each: [{"file", "error"}] (for summary.json)."""
        return [{"file": f, "error": e} for f, e in self._bad.items()]

    @property
    def bad_count(self) -> int:
        return len(self._bad)

    def check_bad_images(self, total: int | None = None, limit: float | None = None) -> None:
        """Raise TooManyBadImages if `total` (default: this rank's count; under DDP pass the sum over ranks)
        exceeds `limit` (default: max_bad_images)."""
        total = self.bad_count if total is None else total
        limit = self.max_bad_images if limit is None else limit
        if total > limit:
            shown = "; ".join(f"{f}: {e}" for f, e in list(self._bad.items())[:3])
            raise TooManyBadImages(
                f"{total} unreadable images, more than the {limit} allowed (max_bad_images; the "
                f"default is {BAD_IMAGE_FRACTION:.1%} of the split). First: {shown}. Remove or replace them, "
                "or raise --max-bad-images"
            )

    def _record_bad(self, bad: list) -> None:
        for name, error in bad:
            self._bad.setdefault(name, error)
        if bad:
            self.check_bad_images()

    # -- batches ----------------------------------------------------------------------------------------
    def use_channels_last(self, channels_last: bool) -> None:
        """Hand out batches in the other layout from the next epoch (or restart of one) on."""
        self.channels_last = channels_last

    def normalize(self, x: torch.Tensor, hwc: bool = False) -> torch.Tensor:
        """uint8 (N, C, H, W), or (N, H, W, C) with `hwc`, on the device -> normalised float32 (N, C, H, W),
        channels_last if asked. Measured on one core for 32 x 3 x 224 x 224 (issue 23): NCHW in 2.9 ms; from
        (N, H, W, C) bytes to channels_last as flat rows 3.1 ms, where reordering NCHW bytes first took 23-27 ms
        (torch's 3-channel uint8 transpose does not vectorise; a multiply straight into a channels_last output
        was no faster). So the folder loader's workers write (N, H, W, C), the layout their resize produces."""
        if hwc:
            n, h, w, c = x.shape
            scale, shift = self._rows_affine(h, w)
            rows = x.reshape(n, h * w * c).float().mul_(scale).add_(shift)
            rows = rows.view(n, h, w, c).permute(0, 3, 1, 2)
            return rows if self.channels_last else rows.contiguous()
        if self.channels_last:  # (shards) reorder the uint8 bytes, not 4x as many floats; float() keeps the layout
            x = x.contiguous(memory_format=torch.channels_last)
        return x.float().mul_(self._scale).add_(self._shift)

    def _rows_affine(self, h: int, w: int) -> tuple[torch.Tensor, ...]:
        """Scale and shift repeated over one (H, W, C) image as a flat row: broadcasting over an innermost
        dimension of 3 channels does not vectorise (the in-memory loader does the same)."""
        key = (h, w)
        if getattr(self, "_rows_key", None) != key:
            c = self._scale.shape[1]
            self._rows = tuple(
                t.reshape(1, 1, c).expand(h, w, c).reshape(1, -1).contiguous() for t in (self._scale, self._shift)
            )
            self._rows_key = key
        return self._rows

    def _items(self) -> Iterator[_Item]:
        raise NotImplementedError

    def __iter__(self):
        hwc = self._hwc  # the layout the epoch's plan asks the workers for
        for pixels, labels, bad, fatal in self._items():
            if fatal:
                raise DatasetError(fatal)
            self._record_bad(bad)
            if isinstance(pixels, int):  # a shared slot: normalize() below copies it out before the next batch
                pixels, labels = self._slots.batch(pixels, len(labels), hwc), torch.from_numpy(labels)
            if pixels is None:
                raise DatasetError(
                    f"every image of a batch failed to decode ({bad[0][0]}: {bad[0][1]}, ...); check the dataset"
                )
            x = pixels.to(self.device, non_blocking=True)
            y = labels.to(self.device, non_blocking=True)
            self.position += 1
            yield self.normalize(x, hwc), y
        self.epoch += 1
        self.position = 0

    def _dataloader(self, dataset, sampler=None, persistent: bool = True) -> torch.utils.data.DataLoader:
        kwargs: dict[str, Any] = (
            {"prefetch_factor": PREFETCH_FACTOR, "persistent_workers": persistent} if self.workers else {}
        )
        return torch.utils.data.DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,
            num_workers=self.workers,
            collate_fn=_identity,
            pin_memory=self.device.type == "cuda",
            **kwargs,
        )

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is deleted)."""
        iterator = getattr(getattr(self, "_loader", None), "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def _base_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "bad_images": [[f, e] for f, e in self._bad.items()],
        }

    def _load_base_state(self, state: dict, kind: str) -> None:
        if state.get("kind") != kind:
            raise DatasetError(
                f"the checkpoint's loader state is for {state.get('kind', 'an in-memory')} data, "
                f"not {kind}; resume with the data mode the run started with"
            )
        for key in ("batch_size", "world_size"):
            if int(state[key]) != getattr(self, key):
                raise DatasetError(
                    f"the run was started with {key} {state[key]}, not {getattr(self, key)}: "
                    f"resume with the same {key} to replay the same batches"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._bad = {str(f): str(e) for f, e in state["bad_images"]}


class _FolderBatches(torch.utils.data.Dataset):
    """Decodes one rank's slice of a batch, keyed (epoch, split indices); runs in a DataLoader worker."""

    def __init__(
        self,
        root: Path,
        split: _FolderSplit,
        transform: ImageTransform,
        fill: bool,
        slots: _SharedBatchSlots | None = None,
    ):
        self.root, self.split, self.transform, self.fill, self.slots = root, split, transform, fill, slots

    def __getitem__(self, key: tuple[int, np.ndarray, int | None, bool]) -> _Item:
        epoch, indices, slot, hwc = key
        pixels: list[np.ndarray | None] = []
        bad: list[tuple[str, str]] = []
        for i in indices:
            name = str(self.root / self.split.names[i])
            try:  # vanished, unreadable or over the size cap: ImageError, a bad image
                pixels.append(self.transform(read_image_file(name), name, epoch, int(i), channels_first=not hwc))
            except ImageError as exc:
                pixels.append(None)
                bad.append((name, str(exc)))
        # a slot is only sent to a loader that has its slots
        out = None if slot is None else cast(_SharedBatchSlots, self.slots).batch(slot, len(indices), hwc)
        x, y = assemble_batch(pixels, self.split.labels[indices].tolist(), self.fill, out=out)
        if out is None or x is None:
            return x, y, bad, None
        return slot, y.numpy(), bad, None  # labels as bytes in the message: a tensor would be one more mapping


class _EpochPlan:
    """The sampler: iterated by the DataLoader in the main process each time an epoch (re)starts. It holds
    its loader weakly: a reference cycle would leave the workers to the garbage collector, whose teardown
    order makes each worker's shutdown wait out a 5 s timeout."""

    def __init__(self, loader: FolderStreamLoader):
        self.loader = weakref.ref(loader)

    def __iter__(self):
        return self.loader()._plan()


class FolderStreamLoader(StreamingLoader):
    """Streams one split of an image folder: training batches (shuffled, RandomResizedCrop + flip, drop_last)
    when `train`, else evaluation batches (in order, resize + centre crop, every image once)."""

    def __init__(
        self,
        source: ImageFolderSource,
        split: str,
        batch_size: int,
        *,
        image_size: int,
        mean,
        std,
        train: bool | None = None,
        seed: int = 0,
        workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        max_bad_images: int | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        draft: bool = True,
    ):
        if split not in source.splits:
            raise ValueError(f"split must be one of {list(source.splits)}, got {split!r}")
        self.source, self.split = source, split
        self.train = split == "train" if train is None else train
        self.seed = seed
        self.indices = np.arange(source.count(split)) if indices is None else np.asarray(indices, dtype=np.int64)
        super().__init__(
            batch_size,
            mean=mean,
            std=std,
            channels=source.channels,
            image_size=image_size,
            split_size=len(self.indices),
            rank=rank,
            world_size=world_size,
            workers=workers,
            device=device,
            channels_last=channels_last,
            max_bad_images=max_bad_images,
        )
        transform = ImageTransform(image_size, source.mode, train=self.train, seed=seed, draft=draft)
        self._slots = (
            _SharedBatchSlots(PREFETCH_FACTOR * workers, (self.local_batch, source.channels, image_size, image_size))
            if workers
            else None
        )
        self._hwc = channels_last  # workers write (N, H, W, C): the decoder's own layout, normalised as rows
        self._dataset = _FolderBatches(source.root, source.splits[split], transform, fill=self.train, slots=self._slots)
        self._loader = self._dataloader(self._dataset, _EpochPlan(self))

    def __len__(self) -> int:
        return len(self._slices())

    def _slices(self) -> list[slice]:
        """Training: this rank's contiguous part of each global batch of the epoch order (drop_last).
        Evaluation: this rank's consecutive share of the split, in batches of its part of the batch size, so
        that the ranks' results joined in rank order are the split's order (as InMemoryLoader does)."""
        n, size = len(self.indices), self.batch_size
        if not self.train:
            lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
            step = max(size // self.world_size, 1)
            return [slice(start, min(start + step, hi)) for start in range(lo, hi, step)]
        out = []
        for start in range(0, n - size + 1, size):
            out.append(
                slice(start + self.rank * size // self.world_size, start + (self.rank + 1) * size // self.world_size)
            )
        return out

    def _order(self, epoch: int) -> np.ndarray:
        if not self.train:
            return self.indices
        return self.indices[np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))]

    def use_channels_last(self, channels_last: bool) -> None:
        """Batches of the next epoch (or restart of one) are decoded in the layout that suits it."""
        self.channels_last = self._hwc = channels_last

    def _plan(self):
        epoch, order, hwc = self.epoch, self._order(self.epoch), self._hwc
        for part in self._slices()[self.position :]:
            yield epoch, order[part], None if self._slots is None else self._slots.take(), hwc

    def _items(self):
        return iter(self._loader)

    def state_dict(self) -> dict:
        return {"kind": "stream", "seed": self.seed, **self._base_state()}

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state, "stream")
        if int(state["seed"]) != self.seed:
            raise DatasetError(f"the run was started with seed {state['seed']}, not {self.seed}")


def sample_channel_stats(source, image_size: int, n: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (pixels scaled to [0, 1]) of `n` training images of an ImageFolderSource
    (spread evenly) or a ShardSource (the first n, packed in random order), each with the evaluation crop:
    an estimate for data too large to scan. Unreadable images are skipped."""
    transform = ImageTransform(image_size, source.mode, train=False)
    total = np.zeros(source.channels)
    total_sq = np.zeros(source.channels)
    count = tried = 0
    for name, data, index in source.encoded_samples("train", n):
        tried += 1
        try:
            if data is None:
                continue
            x = transform(data, name, 0, index).reshape(source.channels, -1).T / 255.0
        except ImageError:
            continue
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += len(x)
    if not count:
        raise DatasetError(f"{source.root}: none of {tried} sampled training images could be decoded")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0))
    return mean.tolist(), std.tolist()
