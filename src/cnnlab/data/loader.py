"""An in-memory batched loader: the whole dataset is one uint8 tensor, augmented a batch at a time."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .augment import Compose, RandomCrop, sample_part

__all__ = ["InMemoryLoader", "split_validation"]


def split_validation(images: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int = 0):
    """Carve a validation split off the training data with a fixed seed: (train_x, train_y, val_x, val_y)."""
    n_val = int(round(len(labels) * fraction))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val:]
    return images[train], labels[train], images[val], labels[val]


class InMemoryLoader:
    """Yields normalised float batches (x, y) on `device`.

    Shuffles each epoch from its own generator; `state_dict` records where in the epoch it stands, so a
    resumed run replays exactly the batches and augmentations an uninterrupted run would have seen.

    In a distributed run (`world_size` > 1) `batch_size` is the global batch: every rank walks the same
    shuffled order and takes its own slice of each global batch, so W ranks together see exactly what one
    process would. Without shuffling (evaluation) each rank takes a consecutive share of the split.
    `resize` scales every batch to (H, W) on the device, for models that need larger input than the data's.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean,
        std,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        augment: Compose | None = None,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        resize: tuple[int, int] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle and batch_size % world_size:
            raise ConfigError(
                f"batch_size {batch_size} cannot be split over {world_size} processes; --batch-size is "
                f"the global batch: choose a multiple of {world_size}, e.g. "
                f"{max(world_size, batch_size // world_size * world_size)}"
            )
        self.rank, self.world_size, self.resize = rank, world_size, tuple(resize) if resize else None
        if not shuffle and world_size > 1:  # evaluation: this rank's consecutive share of the split
            share = slice(len(labels) * rank // world_size, len(labels) * (rank + 1) // world_size)
            images, labels = images[share], labels[share]
        self.device = torch.device(device)
        # The whole uint8 dataset goes to the device once: 60k 28x28 images are 47 MB, CIFAR-10 is 154 MB.
        self.images = images.to(self.device, non_blocking=True)
        self.labels = labels.to(self.device, non_blocking=True)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment = augment
        # A leading random crop pads the whole dataset once, so each step only selects windows.
        self._crop = augment.ops[0] if augment and isinstance(augment.ops[0], RandomCrop) else None
        if self._crop is not None:
            assert augment is not None  # the crop came from it
            self.images = torch.cat([self._crop.pad(chunk) for chunk in self.images.split(8192)])
            self.augment = Compose(augment.ops[1:])
        if channels_last:
            # Stored as (N, H, W, C) so that picking a batch is one contiguous copy per image; the batch is then
            # a channels_last view of shape (N, C, H, W). Converting each batch instead costs more than the rest.
            self.images = self.images.permute(0, 2, 3, 1).contiguous()
        self.channels_last = channels_last
        c = images.shape[1]
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, c, 1, 1)
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, c, 1, 1)
        # (x / 255 - mean) / std as one multiply-add
        self._scale = (1.0 / (255.0 * std_t)).to(self.device)
        self._shift = (-mean_t / std_t).to(self.device)
        # channels_last batches are normalised as flat (N, H*W*C) rows: broadcasting over an innermost
        # dimension of 3 channels does not vectorise and was 4x slower.
        h, w = images.shape[2:]
        self._scale_hwc = self._scale.reshape(1, 1, c).expand(h, w, c).reshape(1, -1).contiguous()
        self._shift_hwc = self._shift.reshape(1, 1, c).expand(h, w, c).reshape(1, -1).contiguous()
        self.generator = torch.Generator().manual_seed(seed)  # order of examples
        self.aug_generator = torch.Generator().manual_seed(seed + 1)  # augmentation draws
        self.epoch = 0  # epochs completed
        self.position = 0  # batches of the current epoch already handed out
        self._epoch_start_state = self.generator.get_state()

    def use_channels_last(self, channels_last: bool) -> None:
        """Store (and hand out) the images in the other layout: for a run whose memory format is decided by
        measuring its model after the data is loaded. One copy of the dataset."""
        if channels_last != self.channels_last:
            order = (0, 2, 3, 1) if channels_last else (0, 3, 1, 2)
            self.images = self.images.permute(*order).contiguous()
            self.channels_last = channels_last

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def local_batch_size(self) -> int:
        """Images per batch on this rank (training); the global batch split W ways."""
        return self.batch_size // self.world_size if self.shuffle else self.batch_size

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_last:
            return x.float().mul_(self._scale).add_(self._shift)
        n, c, h, w = x.shape
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op unless an augmentation changed the layout
        rows = x.permute(0, 2, 3, 1).reshape(n, h * w * c)  # a view of the same memory
        rows = rows.float().mul_(self._scale_hwc).add_(self._shift_hwc)
        return rows.view(n, h, w, c).permute(0, 3, 1, 2)

    def __iter__(self):
        if self.position == 0:
            self._epoch_start_state = self.generator.get_state()
        else:  # resuming mid-epoch: replay this epoch's permutation from its starting state
            self.generator.set_state(self._epoch_start_state)
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        part = None
        if self.shuffle and self.world_size > 1:
            local = self.batch_size // self.world_size
            part = slice(self.rank * local, (self.rank + 1) * local)
        for i in range(self.position, len(self)):
            global_idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            idx = global_idx if part is None else global_idx[part]
            x = self.images.index_select(0, idx)  # much faster than images[idx] on CPU
            if self.channels_last:
                x = x.permute(0, 3, 1, 2)
            if self._crop is not None:
                x = self._crop.apply_padded(
                    x, sample_part(self._crop, len(idx), self.aug_generator, part, len(global_idx))
                )
            if self.augment:  # the indices and the epoch reach only ops that use them (AlternatingFlip)
                x = self.augment(x, self.aug_generator, part, len(global_idx), index=idx, epoch=self.epoch)
            self.position = i + 1
            x = self.normalize(x)
            if self.resize and tuple(x.shape[-2:]) != self.resize:
                x = F.interpolate(
                    x, size=self.resize, mode="bilinear", align_corners=False, antialias=self.resize[0] < x.shape[-2]
                )
                x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            yield x, self.labels.index_select(0, idx)
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "generator": self._epoch_start_state if self.position else self.generator.get_state(),
            "aug_generator": self.aug_generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.generator.set_state(state["generator"])
        self._epoch_start_state = state["generator"]
        self.aug_generator.set_state(state["aug_generator"])
