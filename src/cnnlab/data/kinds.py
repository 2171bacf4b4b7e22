"""What kind of source a dataset is, decided once from its catalogue entry and the data mode: a named dataset
decoded into memory, an image folder in memory or streamed, packed shards (always streamed), or synthetic data.
Everything outside data/ asks this instead of comparing dataset names."""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import get_spec

__all__ = ["DataKind", "data_kind", "STREAM_AUGMENT"]

# Streamed images are augmented per sample as torchvision's ImageNet reference does.
STREAM_AUGMENT = "RandomResizedCrop+flip"


@dataclass(frozen=True)
class DataKind:
    dataset: str
    format: str  # the catalogue's: idx, cifar10, cifar100, imagefolder, shards, synthetic
    streamed: bool
    default_augment: str  # what `augment: auto` means for it

    @property
    def image_folder(self) -> bool:
        return self.format == "imagefolder"

    @property
    def shards(self) -> bool:
        return self.format == "shards"

    @property
    def own_files(self) -> bool:
        """The user's own images (a folder or its shards): they need --data-dir and have no publisher checksum."""
        return self.format in ("imagefolder", "shards")

    @property
    def synthetic(self) -> bool:
        return self.format == "synthetic"


def data_kind(dataset: str, mode: str = "memory") -> DataKind:
    """`mode` ("memory" or "stream", as chosen for an image folder) matters only to image folders: shards always
    stream and the named datasets always load into memory. An unknown name is a DatasetError with a hint."""
    spec = get_spec(dataset)
    streamed = spec.format == "shards" or (spec.format == "imagefolder" and mode == "stream")
    return DataKind(dataset, spec.format, streamed, STREAM_AUGMENT if streamed else spec.default_augment)
