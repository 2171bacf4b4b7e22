"""The test split of a trained model's data, as `cnnlab eval` and the report read it: in memory for the named
datasets and small image folders, streamed for the runs that streamed (large folders, shards)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import DatasetError
from .runtime import Runtime

__all__ = ["TestSplit", "open_test_split"]


@dataclass
class TestSplit:
    loader: object  # yields normalised (x, y) batches on the runtime's device
    classes: list[str]
    labels: torch.Tensor | None  # in the loader's order (None for shards, which are not indexed)
    channels: int
    image: Callable[[int], np.ndarray]  # uint8 (H, W, C) of test image i, as the model saw it
    runtime: Runtime  # the device, precision and memory format the loader's batches are made for


def open_test_split(dataset: str, data_dir: str | None, *, input_shape, mean, std, runtime: Runtime,
                    streamed: bool = False, workers: int = 2, log=print) -> TestSplit:
    """The test split for a model that takes `input_shape` (C, H, W) normalised by mean/std; `streamed` (as the
    run was trained) decodes per sample instead of loading the split into memory."""
    c, h, w = input_shape
    if streamed or dataset == "shards":
        from ..data.shards import ShardLoader, open_shards
        from ..data.stream import FolderStreamLoader, open_image_folder
        from ..data.transforms import ImageTransform
        if data_dir is None:
            raise DatasetError(f"{dataset} needs --data-dir")
        shards = dataset == "shards"
        source = open_shards(data_dir) if shards else open_image_folder(data_dir)
        kind = ShardLoader if shards else FolderStreamLoader
        loader = kind(source, "test", 256, train=False, image_size=h, mean=mean, std=std, workers=workers,
                      device=runtime.device, channels_last=runtime.channels_last)
        transform = ImageTransform(h, source.mode, train=False)

        def image(i: int) -> np.ndarray:
            if shards:
                raise DatasetError("shard test images are not indexed")
            name = str(source.root / source.splits["test"].names[i])
            with open(name, "rb") as f:
                return transform(f.read(), name, 0, i).transpose(1, 2, 0)
        labels = None if shards else torch.from_numpy(source.labels("test"))
        return TestSplit(loader, list(source.classes), labels, source.channels, image, runtime)
    from ..data import InMemoryLoader, load_dataset
    data = load_dataset(dataset, data_dir, log=log, image_size=h if dataset == "imagefolder" else None)
    if data.shape[0] != c:
        raise DatasetError(f"{dataset} has {data.shape[0]}-channel images, the model takes {c}")
    resize = (h, w) if (h, w) != tuple(data.shape[1:]) else None
    loader = InMemoryLoader(data.test_images, data.test_labels, 1024, mean=mean, std=std, device=runtime.device,
                            channels_last=runtime.channels_last, resize=resize)
    return TestSplit(loader, list(data.classes), data.test_labels, c,
                     lambda i: data.test_images[i].permute(1, 2, 0).numpy(), runtime)
