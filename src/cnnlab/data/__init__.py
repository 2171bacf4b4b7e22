"""Datasets (files and checksums as data), downloads, an in-memory loader and batched augmentation."""

from .augment import AlternatingFlip, Compose, Cutout, HorizontalFlip, RandomCrop, Translate, parse_augment
from .catalog import CATALOG, DatasetSpec, dataset_names, get_spec
from .datasets import Dataset, cache_dir, channel_stats, fetch, load_dataset, locate
from .loader import InMemoryLoader, split_validation

__all__ = [
    "AlternatingFlip",
    "Compose",
    "Cutout",
    "HorizontalFlip",
    "RandomCrop",
    "Translate",
    "parse_augment",
    "CATALOG",
    "DatasetSpec",
    "dataset_names",
    "get_spec",
    "Dataset",
    "cache_dir",
    "channel_stats",
    "fetch",
    "load_dataset",
    "locate",
    "InMemoryLoader",
    "split_validation",
]
