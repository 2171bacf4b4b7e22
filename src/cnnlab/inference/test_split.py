"""The test split of a trained model's data, as `cnnlab eval` and the report read it: in memory for the named
datasets and small image folders, streamed for the runs that streamed (large folders, shards)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.kinds import data_kind
from ..data.preprocess import Preprocess
from ..errors import CheckpointError, DatasetError
from ..run import Run, open_run
from ..training.runtime import Runtime

__all__ = ["TestSplit", "open_test_split", "highest_loss_images"]


@dataclass
class TestSplit:
    loader: Any  # InMemoryLoader or a streaming loader: yields normalised (x, y) batches on the runtime's device
    classes: list[str]
    labels: torch.Tensor | None  # in the loader's order (None for shards, which are not indexed)
    channels: int
    image: Callable[[int], np.ndarray]  # uint8 (H, W, C) of test image i, as the model saw it
    runtime: Runtime  # the device, precision and memory format the loader's batches are made for
    files: list[str] | None = None  # an image folder's test files, in the loader's order


def open_test_split(
    dataset: str,
    data_dir: str | None,
    *,
    preprocess: Preprocess,
    runtime: Runtime,
    streamed: bool = False,
    workers: int = 2,
    log=print,
) -> TestSplit:
    """The test split as a model with `preprocess` takes it (its recorded resize rule, size and normalisation);
    `streamed` (as the run was trained) decodes per sample instead of loading the split into memory."""
    c, h, w = preprocess.input_shape
    mean, std = list(preprocess.mean or ()), list(preprocess.std or ())
    kind = data_kind(dataset, "stream" if streamed else "memory")
    if kind.streamed:
        from ..data.shards import ShardLoader, open_shards
        from ..data.stream import FolderStreamLoader, open_image_folder

        if data_dir is None:
            raise DatasetError(f"{dataset} needs --data-dir")
        # a ShardSource or an ImageFolderSource, with the loader class that reads it
        source: Any = open_shards(data_dir) if kind.shards else open_image_folder(data_dir)
        loader_class = ShardLoader if kind.shards else FolderStreamLoader
        loader: Any = loader_class(
            source,
            "test",
            256,
            train=False,
            image_size=h,
            mean=mean,
            std=std,
            workers=workers,
            device=runtime.device,
            channels_last=runtime.channels_last,
        )

        def image(i: int) -> np.ndarray:
            if kind.shards:
                raise DatasetError("shard test images are not indexed")
            return preprocess.load(source.root / source.splits["test"].names[i]).transpose(1, 2, 0)

        labels = None if kind.shards else torch.from_numpy(source.labels("test"))
        files = None if kind.shards else [str(source.root / name) for name in source.splits["test"].names]
        return TestSplit(loader, list(source.classes), labels, source.channels, image, runtime, files)
    from ..data import InMemoryLoader, load_dataset

    data = load_dataset(dataset, data_dir, log=log, preprocess=preprocess if kind.image_folder else None)
    if data.shape[0] != c:
        raise DatasetError(f"{dataset} has {data.shape[0]}-channel images, the model takes {c}")
    resize = (h, w) if (h, w) != tuple(data.shape[1:]) else None
    loader = InMemoryLoader(
        data.test_images,
        data.test_labels,
        1024,
        mean=mean,
        std=std,
        device=runtime.device,
        channels_last=runtime.channels_last,
        resize=resize,
    )
    files = None
    if kind.image_folder:  # decoded in image_folder_files' order, each split in turn
        from ..data.imagefolder import image_folder_files, split_of

        root = Path(data.source)
        files = [str(p) for p in image_folder_files(root) if split_of(root, p)[0] == "test"]
    return TestSplit(
        loader,
        list(data.classes),
        data.test_labels,
        c,
        lambda i: data.test_images[i].permute(1, 2, 0).numpy(),
        runtime,
        files,
    )


def highest_loss_images(run: Run | str | Path, k: int = 16, data_dir: str | None = None) -> dict[str, torch.Tensor]:
    """The `k` test images the run's final model got most wrong: `indices` into the test split, `images` uint8
    (k, C, H, W) as the model saw them (before normalisation), `labels`, `preds` and `losses`, highest loss first.
    The test split is found as training found it (Run.data_dir, or `data_dir`)."""
    run = run if isinstance(run, Run) else open_run(run)
    saved = run.predictions()
    split = open_test_split(
        run.config.dataset,
        run.data_dir(data_dir),
        preprocess=run.weights.preprocess,
        runtime=Runtime(torch.device("cpu")),
        streamed=run.data_mode == "stream",
        workers=0,
        log=lambda m: None,
    )
    if split.labels is None or not torch.equal(split.labels, saved["labels"]):
        raise CheckpointError(
            f"{run.path}: its predictions.safetensors does not match the test split of "
            f"{run.config.dataset} found now (other files or another order); score the run again "
            f"with 'cnnlab eval {run.path}'"
        )
    losses, top = saved["losses"].topk(min(k, len(saved["losses"])))
    images = torch.stack([torch.from_numpy(split.image(i).copy()).permute(2, 0, 1) for i in top.tolist()])
    return {
        "indices": top,
        "images": images,
        "labels": saved["labels"][top],
        "preds": saved["preds"][top],
        "losses": losses,
    }
