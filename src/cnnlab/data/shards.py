"""WebDataset-style shards: an image folder packed into tar files of KEY.<ext> (the file's original bytes) and
KEY.cls (the class index as text), with a JSON manifest, and a streaming reader that trains from them.

Written and read with the standard library's tarfile (no member is ever extracted to disk), so a shard is
readable by any tar tool and by the `webdataset` package, which cnnlab does not need.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DatasetError, ImageError
from ..files import atomic_file, save_atomic
from .imagefolder import image_folder_classes, image_folder_files, split_of
from .images import limits, open_encoded, raise_hint, read_image_file
from .stream import StreamingLoader, assemble_batch, parse_bytes
from .transforms import GRAY_MODES, ImageTransform

__all__ = ["MANIFEST", "FORMAT_VERSION", "pack_image_folder", "ShardSource", "open_shards", "ShardLoader"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
PACK_SEED = 0  # the training split is packed in one fixed random order, so every shard holds every class
_SHARD_NAME = re.compile(r"(train|test)-\d{6}\.tar")


def _key(index: int, path: Path) -> str:
    """The sample's key: its place in the split and its file name, without dots (webdataset splits there)."""
    return f"{index:08d}_{re.sub(r'[^A-Za-z0-9_-]', '_', path.stem)[:64]}"


class _HashingWriter:
    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644  # fixed metadata: packing twice gives the same bytes
    info.uname = info.gname = ""
    return info


def _write_shard(path: Path, samples: list[tuple[str, str, bytes, int]]) -> dict:
    """Write one tar of (key, extension, bytes, label) samples atomically; returns its manifest entry."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        # a stream ("w|") only calls write(); typeshed's fileobj also asks for read, seek, tell and close
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for key, ext, data, label in samples:
                cls = str(label).encode()
                tar.addfile(_member(f"{key}.cls", len(cls)), io.BytesIO(cls))
                tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
    return {"name": path.name, "samples": len(samples), "bytes": writer.bytes, "sha256": writer.sha.hexdigest()}


def pack_image_folder(
    root: str | Path, out: str | Path, shard_size: int | str = "256MB", log: Callable[[str], None] = print
) -> dict:
    """Pack ROOT/train|test/<class>/* into OUT/{train,test}-NNNNNN.tar and OUT/manifest.json; returns the
    manifest. Training samples go in a fixed shuffled order (seed 0), test samples in sorted order."""
    root, out = Path(root), Path(out)
    limit = parse_bytes(shard_size)
    if limit < 1:
        raise DatasetError(f"shard size {shard_size!r} must be positive")
    classes = image_folder_classes(root)
    files: dict[str, list[Path]] = {"train": [], "test": []}
    for path in image_folder_files(root):
        files[split_of(root, path)[0]].append(path)
    if not files["test"]:
        raise DatasetError(f"{root}: the test split holds no images")
    files["train"] = [files["train"][i] for i in np.random.default_rng(PACK_SEED).permutation(len(files["train"]))]
    out.mkdir(parents=True, exist_ok=True)
    index = {c: i for i, c in enumerate(classes)}
    gray = True
    splits: dict[str, dict[str, Any]] = {}
    for split, paths in files.items():
        shards: list[dict] = []
        pending: list[tuple[str, str, bytes, int]] = []
        pending_bytes = 0
        for i, path in enumerate(paths):
            try:
                data = read_image_file(path)
            except ImageError as exc:
                raise DatasetError(f"{exc}; fix or remove it") from None
            try:  # the header alone (no pixels): only to know whether the dataset is all greyscale
                gray &= open_encoded(data, path).mode in GRAY_MODES
            except Exception:
                pass  # packed as it is; the loader skips and names it
            size = 1024 + 512 * math.ceil(len(data) / 512)  # two tar headers, the .cls block and the padded data
            if pending and pending_bytes + size > limit:
                shards.append(_write_shard(out / f"{split}-{len(shards):06d}.tar", pending))
                pending, pending_bytes = [], 0
            ext = path.suffix.lower().lstrip(".") or "bin"
            pending.append((_key(i, path), ext, data, index[split_of(root, path)[1]]))
            pending_bytes += size
        if pending:
            shards.append(_write_shard(out / f"{split}-{len(shards):06d}.tar", pending))
        splits[split] = {
            "samples": len(paths),
            "shards": shards,
            "order": f"shuffled (seed {PACK_SEED})" if split == "train" else "sorted by path",
        }
        log(
            f"{split}: {len(paths):,} images in {len(shards)} shard(s), "
            f"{sum(s['bytes'] for s in shards) / 2**20:.1f} MiB"
        )
    manifest = {
        "format": "cnnlab-shards",
        "version": FORMAT_VERSION,
        "source": str(root),
        "classes": classes,
        "mode": "L" if gray else "RGB",
        "counts": {s: v["samples"] for s, v in splits.items()},
        "splits": splits,
    }
    save_atomic(json.dumps(manifest, indent=1).encode(), out / MANIFEST)
    current = {s["name"] for v in splits.values() for s in v["shards"]}
    for stale in out.iterdir():  # shards of an earlier, larger pack into the same folder
        if _SHARD_NAME.fullmatch(stale.name) and stale.name not in current:
            stale.unlink()
    return manifest


@dataclass
class ShardSource:
    """A packed dataset: its manifest, checked against the shard files on disk."""

    root: Path
    manifest: dict

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def count(self, split: str) -> int:
        return int(self.manifest["splits"][split]["samples"])

    def shards(self, split: str) -> list[dict]:
        return self.manifest["splits"][split]["shards"]

    def encoded_samples(self, split: str, n: int) -> Iterator[tuple[str, bytes | None, int]]:
        """(member name, bytes, index) of the first `n` samples of the split (checking each shard read)."""
        index = 0
        for entry in self.shards(split):
            for _, name, data, _ in read_shard(self.root / entry["name"], entry, classes=len(self.classes)):
                if index >= n:
                    return
                yield name, data, index
                index += 1


def open_shards(root: str | Path) -> ShardSource:
    """Read OUT/manifest.json, check its fields (images.Limits bounds the classes), and check that every shard
    it names is there with its recorded size."""
    root = Path(root)
    fix = f"pack them again with 'cnnlab data pack IMAGE_ROOT {root}'"
    lim = limits()
    path = root / MANIFEST
    try:
        with open(path, "rb") as f:
            text = f.read(lim.json_bytes + 1)
        if len(text) > lim.json_bytes:
            raise DatasetError(f"{path}: more than {lim.json_bytes:,} bytes, far more than a manifest takes; {fix}")
        manifest = json.loads(text)
    except FileNotFoundError:
        raise DatasetError(f"{path} not found: {root} holds no packed shards; {fix}") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise DatasetError(f"{path} is unreadable ({str(exc)[:200]}); {fix}") from None
    if not isinstance(manifest, dict):
        raise DatasetError(f"{path}: not a JSON object; {fix}")
    if manifest.get("format") != "cnnlab-shards" or manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
            f"expected cnnlab-shards version {FORMAT_VERSION}; {fix}"
        )
    _check_manifest(manifest, path, fix, lim)
    for split in ("train", "test"):
        for entry in manifest["splits"][split]["shards"]:
            shard = root / entry["name"]
            if not shard.is_file():
                raise DatasetError(f"{shard} is missing; copy it again or {fix}")
            if shard.stat().st_size != entry["bytes"]:
                raise DatasetError(
                    f"{shard}: {shard.stat().st_size:,} bytes, the manifest says {entry['bytes']:,}; "
                    f"the shard is truncated or corrupt: copy it again or {fix}"
                )
    return ShardSource(root, manifest)


def _check_manifest(manifest: dict, path: Path, fix: str, lim) -> None:
    """Every field the loader uses, with its type and range: a manifest is a file someone handed us."""

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    classes = manifest.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise DatasetError(f"{path}: 'classes' must be a non-empty list of class names; {fix}")
    if len(classes) > lim.classes:
        raise DatasetError(
            f"{path}: lists {len(classes):,} classes, more than cnnlab trains on ({lim.classes:,}); "
            f"{fix}, or {raise_hint('classes')}"
        )
    if len(set(classes)) != len(classes):
        raise DatasetError(f"{path}: a class is listed twice; {fix}")
    if manifest.get("mode") not in ("RGB", "L"):
        raise DatasetError(f"{path}: mode {str(manifest.get('mode'))[:40]!r}, expected 'RGB' or 'L'; {fix}")
    splits: Any = manifest.get("splits")  # JSON of any shape until checked here
    for split in ("train", "test"):
        entries = (
            splits.get(split, {}).get("shards")
            if isinstance(splits, dict) and isinstance(splits.get(split), dict)
            else None
        )
        if not entries:
            raise DatasetError(f"{path} lists no {split} shards; {fix}")
        if not isinstance(entries, list) or not all(
            isinstance(e, dict)
            and isinstance(e.get("name"), str)
            and _SHARD_NAME.fullmatch(e["name"])
            and whole(e.get("samples"))
            and whole(e.get("bytes"))
            and isinstance(e.get("sha256"), str)
            for e in entries
        ):
            raise DatasetError(
                f"{path}: a {split} shard entry is malformed (each needs a name like "
                f"{split}-000000.tar, samples, bytes and sha256); {fix}"
            )
        if not whole(splits[split].get("samples")) or splits[split]["samples"] != sum(e["samples"] for e in entries):
            raise DatasetError(f"{path}: the {split} sample count differs from its shards' total; {fix}")


class _HashingReader:
    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        return data


def _label(raw: bytes, classes: int | None, name: str, fix: str) -> int:
    """A .cls member's class index, checked against the manifest's classes (the loss would take -100 as
    "ignore" and fail on 999 with an IndexError)."""
    text = raw.strip()
    if not re.fullmatch(rb"[+-]?[0-9]+", text):
        raise DatasetError(f"{name}: label {text[:32]!r} is not a class index; {fix}")
    label = int(text)
    if classes is not None and not 0 <= label < classes:
        raise DatasetError(
            f"{name}: label {label} is not one of the manifest's {classes} classes (0 to {classes - 1}); {fix}"
        )
    return label


def read_shard(
    path: Path, entry: dict, first: int = 0, stop: int | None = None, classes: int | None = None
) -> Iterator[tuple[int, str, bytes | None, int]]:
    """Yield (member index, member name, image bytes, label) of samples first..stop-1 of one shard, reading
    the whole file sequentially so that its sha256 is checked against the manifest entry at the end.
    Image bytes are None for a member over the image size cap (images.Limits), judged on its header: such a
    member, a sparse one too, is never read. Labels are checked against `classes`; a key seen twice, an
    oversized .cls member and a bad label raise DatasetError naming the shard and the fix."""
    stop = entry["samples"] if stop is None else stop
    fix = f"copy it again, or re-run 'cnnlab data pack IMAGE_ROOT {path.parent}'"
    lim = limits()
    n = 0
    try:
        with open(path, "rb") as f:
            reader = _HashingReader(f)
            # a stream ("r|") only calls read(); typeshed's fileobj also asks for write, seek, tell and close
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                key, image, label = None, None, None
                seen: set[str] = set()

                def finish():
                    if key is None:
                        return None
                    if image is None or label is None:
                        raise DatasetError(f"{path}: sample {key!r} lacks its image or its .cls member; {fix}")
                    return image, label

                for member in tar:
                    if not member.isfile():
                        continue
                    k, _, ext = member.name.rpartition("/")[2].partition(".")
                    if k != key:
                        done = finish()
                        if done is not None:
                            if first <= n < stop:
                                yield n, done[0][0], done[0][1], done[1]
                            n += 1
                        if k in seen:
                            raise DatasetError(
                                f"{path}: key {k[:80]!r} appears twice ({member.name[:100]!r}); "
                                f"a shard holds each sample once: {fix}"
                            )
                        seen.add(k)
                        key, image, label = k, None, None
                    wanted = first <= n < stop
                    name = f"{path}:{member.name[:200]}"
                    if ext == "cls":
                        if label is not None:
                            raise DatasetError(f"{name}: a second .cls member for one sample; {fix}")
                        if member.size > lim.label_bytes:  # the header's size: a sparse 4 GiB member is not read
                            raise DatasetError(
                                f"{name}: a .cls member of {member.size:,} bytes, more than a class "
                                f"index takes ({lim.label_bytes}); {fix}"
                            )
                        label = _label(tar.extractfile(member).read(), classes, name, fix)
                    elif image is None:
                        big = member.size > lim.image_bytes
                        data = tar.extractfile(member).read() if wanted and not big else None
                        image = (name, data)
                done = finish()
                if done is not None:
                    if first <= n < stop:
                        yield n, done[0][0], done[0][1], done[1]
                    n += 1
            while reader.read(1 << 20):  # the end-of-archive blocks count towards the hash too
                pass
    except (tarfile.TarError, ValueError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable tar shard ({type(exc).__name__}: {exc}); {fix}") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc}); {fix}") from None
    if n != entry["samples"]:
        raise DatasetError(f"{path}: {n} samples, the manifest says {entry['samples']}; {fix}")
    digest = reader.sha.hexdigest()
    if digest != entry["sha256"]:
        raise DatasetError(
            f"{path}: sha256 {digest[:12]}... differs from the manifest's {entry['sha256'][:12]}...; "
            f"the shard is corrupt: {fix}"
        )


def _segments(counts: np.ndarray, order: np.ndarray, start: int, stop: int) -> list[tuple[int, int, int]]:
    """The samples start..stop-1 of the shards concatenated in `order`, as (shard, first member, stop member)."""
    out, offset = [], 0
    for shard in order:
        n = int(counts[shard])
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append((int(shard), lo - offset, hi - offset))
        offset += n
        if offset >= stop:
            break
    return out


class _ShardBatches(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker: reads its streams' shards, shuffles, decodes and yields batches."""

    def __init__(self, loader: ShardLoader):
        source = loader.source
        entries = source.shards(loader.split)
        self.root = source.root
        self.entries = entries
        self.counts = np.asarray([e["samples"] for e in entries], dtype=np.int64)
        self.uid_base = np.concatenate([[0], np.cumsum(self.counts)[:-1]])  # sample index in packed order
        self.transform = ImageTransform(
            loader.image_size, source.mode, train=loader.train, seed=loader.seed, draft=loader.draft
        )
        self.train, self.seed, self.buffer = loader.train, loader.seed, loader.shuffle_buffer
        self.buffer_bytes = limits().shuffle_buffer_bytes  # read here: workers get the main process's limits
        self.classes = len(source.classes)
        self.rank, self.world_size, self.batch = loader.rank, loader.world_size, loader.local_batch
        self.streams = loader.streams
        self.epoch, self.position = loader.epoch, loader.position

    # -- the plan: a pure function of (seed, epoch, rank, world size, streams, batch) and the manifest -------
    def stream_range(self, epoch: int, stream: int) -> tuple[np.ndarray, int, int]:
        """(shard order, first sample, stop sample) of one of this rank's training streams."""
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.counts))
        per_stream = batches_per_stream(int(self.counts.sum()), self.world_size, self.streams, self.batch) * self.batch
        start = (self.rank * self.streams + stream) * per_stream
        return order, start, start + per_stream

    def _samples(self, segments) -> Iterator[tuple[int, str, bytes | None, int]]:
        for shard, first, stop in segments:
            base = int(self.uid_base[shard])
            for n, name, data, label in read_shard(
                self.root / self.entries[shard]["name"], self.entries[shard], first, stop, self.classes
            ):
                yield base + n, name, data, label

    def _shuffled(self, samples, rng: np.random.Generator):
        """A shuffle buffer: each new sample takes the place of a random one, which is emitted. It holds at most
        `buffer` samples and, beyond one sample, `buffer_bytes` encoded bytes (16 sparse 250 MiB members once
        took 4.4 GB): while over the bytes, random samples leave without replacement."""
        buffer: list[tuple[int, str, bytes | None, int]] = []
        held = 0
        for sample in samples:
            size = len(sample[2]) if sample[2] is not None else 0
            if len(buffer) < self.buffer and (held + size <= self.buffer_bytes or not buffer):
                buffer.append(sample)
                held += size
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], sample = sample, buffer[j]
            held += size - (len(sample[2]) if sample[2] is not None else 0)
            yield sample
            while held > self.buffer_bytes and len(buffer) > 1:
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                sample = buffer.pop()
                held -= len(sample[2]) if sample[2] is not None else 0
                yield sample
        for j in rng.permutation(len(buffer)):
            yield buffer[j]

    def _decode(self, samples: list, epoch: int) -> tuple:
        pixels: list[np.ndarray | None] = []
        bad: list[tuple[str, str]] = []
        for uid, name, data, _ in samples:
            try:
                if data is None:
                    raise ImageError(
                        f"{name}: larger than an image file may be ({limits().image_bytes:,} bytes), "
                        f"not read; {raise_hint('image_bytes')} to read it"
                    )
                pixels.append(self.transform(data, name, epoch, uid))
            except ImageError as exc:
                pixels.append(None)
                bad.append((name, str(exc)))
        x, y = assemble_batch(pixels, [s[3] for s in samples], fill=self.train)
        return x, y, bad, None

    def _train_batches(self, worker: int, workers: int):
        epoch, position, S = self.epoch, self.position, self.streams
        total = S * batches_per_stream(int(self.counts.sum()), self.world_size, S, self.batch)
        iterators = {}
        # Logical batch g comes from stream g % S (its batch g // S); DataLoader hands out worker outputs in
        # turn, so worker w serves g = position + w, position + w + workers, ... (workers divides S).
        for g in range(position + worker, total, workers):
            s = g % S
            if s not in iterators:
                order, start, stop = self.stream_range(epoch, s)
                rng = np.random.default_rng([self.seed, epoch, 2, self.rank * S + s])
                stream = self._shuffled(self._samples(_segments(self.counts, order, start, stop)), rng)
                for _ in range(max(0, -(-(position - s) // S)) * self.batch):  # consumed before the resume
                    next(stream)
                iterators[s] = stream
            samples = [next(iterators[s]) for _ in range(self.batch)]
            yield self._decode(samples, epoch)

    def _eval_batches(self, worker: int, workers: int):
        n = int(self.counts.sum())
        lo, hi = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        lo, hi = lo + worker * (hi - lo) // workers, lo + (worker + 1) * (hi - lo) // workers
        samples = self._samples(_segments(self.counts, np.arange(len(self.counts)), lo, hi))
        while batch := [s for _, s in zip(range(self.batch), samples)]:
            yield self._decode(batch, 0)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        try:
            yield from (self._train_batches if self.train else self._eval_batches)(worker, workers)
        except DatasetError as exc:  # handed to the main process, which raises it without a worker traceback
            yield None, torch.zeros(0, dtype=torch.int64), [], str(exc)


def batches_per_stream(samples: int, world_size: int, streams: int, batch: int) -> int:
    """Each of world_size x streams streams reads an equal, contiguous range of the epoch's samples; every
    rank therefore yields the same number of batches (DDP would hang otherwise)."""
    return samples // (world_size * streams * batch)


class ShardLoader(StreamingLoader):
    """Trains from (or evaluates on) packed shards; see StreamingLoader for the interface.

    Training: each epoch shuffles the shard order (seed, epoch), cuts the concatenated samples into
    world_size x streams equal ranges (rank-major), and reads each range through its own shuffle buffer;
    the rank's batches take turns over its streams. Evaluation: each rank reads its contiguous share of the
    test samples once, in order. Shards are checked against their manifest sha256 as they are read.
    """

    def __init__(
        self,
        source: ShardSource,
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
        shuffle_buffer: int = 1000,
        streams: int | None = None,
        draft: bool = True,
    ):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.source, self.split = source, split
        self.train = split == "train" if train is None else train
        self.seed, self.shuffle_buffer, self.draft = seed, shuffle_buffer, draft
        self._requested_workers = workers
        super().__init__(
            batch_size,
            mean=mean,
            std=std,
            channels=source.channels,
            image_size=image_size,
            split_size=source.count(split),
            rank=rank,
            world_size=world_size,
            workers=workers,
            device=device,
            channels_last=channels_last,
            max_bad_images=max_bad_images,
        )
        self._set_streams(streams or max(workers, 1))
        if self.train and len(self) == 0:
            raise DatasetError(
                f"{source.count(split):,} training samples cannot give each of {world_size} "
                f"process(es) x {self.streams} stream(s) one batch of {self.local_batch}; lower "
                "the batch size or the number of workers"
            )

    def _set_streams(self, streams: int) -> None:
        """Streams fix the sample order; workers must divide them, so use the most workers that do."""
        self.streams = streams
        wanted = max(self._requested_workers, 1)
        self.workers = (
            0
            if self._requested_workers == 0
            else max(d for d in range(1, streams + 1) if streams % d == 0 and d <= wanted)
        )

    def _eval_counts(self) -> list[int]:
        n, w, k = self.source.count(self.split), self.world_size, max(self.workers, 1)
        lo, hi = self.rank * n // w, (self.rank + 1) * n // w
        return [(lo + (i + 1) * (hi - lo) // k) - (lo + i * (hi - lo) // k) for i in range(k)]

    def __len__(self) -> int:
        if self.train:
            return self.streams * batches_per_stream(
                self.source.count(self.split), self.world_size, self.streams, self.local_batch
            )
        return sum(math.ceil(c / self.local_batch) for c in self._eval_counts())

    def _items(self):
        # Workers are started for each epoch (not persistent): they take the epoch and position with them.
        return iter(self._dataloader(_ShardBatches(self), persistent=False))

    def state_dict(self) -> dict:
        return {
            "kind": "shards",
            "seed": self.seed,
            "streams": self.streams,
            "shuffle_buffer": self.shuffle_buffer,
            "samples_consumed": self.position * self.batch_size,
            **self._base_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state, "shards")
        for key in ("seed", "shuffle_buffer"):
            if int(state[key]) != getattr(self, key):
                raise DatasetError(
                    f"the run was started with {key} {state[key]}, not {getattr(self, key)}: "
                    f"resume with the same {key} to replay the same batches"
                )
        self._set_streams(int(state["streams"]))
