"""Augmentations on whole (N, C, H, W) batches, driven by a `torch.Generator`.

Each augmentation draws its random parameters for the whole batch in `sample` and applies them in
`apply`, so a test can replay the same draws through a per-image reference loop. They work on any
dtype (uint8 in the loader, before normalisation) and on any device. An op whose `uses_index` is true
(AlternatingFlip) also gets each image's dataset index and the epoch: `sample(n, generator, index=, epoch=)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = [
    "RandomCrop",
    "HorizontalFlip",
    "AlternatingFlip",
    "Translate",
    "Cutout",
    "Compose",
    "parse_augment",
    "AUGMENT_HELP",
    "sample_part",
]

AUGMENT_HELP = (
    "comma-separated: crop:PAD[:zero|reflect] (random crop after padding), flip (horizontal, p=0.5), "
    "altflip (each image flipped in every other epoch, Jordan 2024), "
    "translate:PIXELS (random shift, zero fill), cutout:SIZE (zero a random square); 'none' for none"
)


def _randint(low: int, high: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n integers in [low, high], drawn on the CPU so draws do not depend on the device."""
    return torch.randint(low, high + 1, (n,), generator=generator)


def shift_images(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, mode: str = "zero") -> torch.Tensor:
    """out[n, :, i, j] = x[n, :, i + dy[n], j + dx[n]], with zeros (or reflection) outside the image."""
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device)[None] + dy.to(x.device)[:, None]  # (N, H) source rows
    cols = torch.arange(w, device=x.device)[None] + dx.to(x.device)[:, None]  # (N, W) source columns
    if mode == "reflect":  # mirror without repeating the edge, like torch's 'reflect' padding
        rows = torch.where(rows < 0, -rows, torch.where(rows >= h, 2 * (h - 1) - rows, rows))
        cols = torch.where(cols < 0, -cols, torch.where(cols >= w, 2 * (w - 1) - cols, cols))
        valid = None
    else:
        valid = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    out = x.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    out = out.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    return out if valid is None else out.masked_fill(~valid, 0)


@dataclass
class RandomCrop:
    """Pad by `padding` on every side, then crop back to the input size at a random offset.

    `apply_padded` takes images padded beforehand, so a loader can pad its whole dataset once and
    leave only the window selection in the step.
    """

    padding: int
    mode: str = "zero"

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"dy": _randint(0, 2 * self.padding, n, generator), "dx": _randint(0, 2 * self.padding, n, generator)}

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        if self.mode == "zero":
            return F.pad(x, (p, p, p, p))
        h, w = x.shape[-2:]
        # reflect without repeating the edge (torch's 'reflect'), by index so that it works for uint8 too
        rows = torch.cat([torch.arange(p, 0, -1), torch.arange(h), torch.arange(h - 2, h - 2 - p, -1)]).to(x.device)
        cols = torch.cat([torch.arange(p, 0, -1), torch.arange(w), torch.arange(w - 2, w - 2 - p, -1)]).to(x.device)
        return x.index_select(-2, rows).index_select(-1, cols)

    def apply_padded(self, padded: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        n, c, hp, wp = padded.shape
        k = 2 * self.padding + 1
        s = padded.stride()
        # every crop position as a view (N, dy, dx, C, H, W), then one gather of each image's window
        windows = padded.as_strided((n, k, k, c, hp - k + 1, wp - k + 1), (s[0], s[2], s[3], s[1], s[2], s[3]))
        return windows[torch.arange(n, device=padded.device), p["dy"].to(padded.device), p["dx"].to(padded.device)]

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.apply_padded(self.pad(x), p)


@dataclass
class HorizontalFlip:
    p: float = 0.5

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"flip": torch.rand(n, generator=generator) < self.p}

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen = p["flip"].nonzero().flatten().to(x.device)
        out = x.clone()
        out[chosen] = x.index_select(0, chosen).flip(3)  # only the flipped half is copied twice
        return out


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) on int64 tensors holding values < 2**32.

    The multipliers are below 2**31, so no product leaves int64: the result is exact on every device.
    """
    for multiplier in (0x7FEB352D, 0x1B873593):
        x = x ^ (x >> 16)
        x = (x * multiplier) & _MASK32
    return x ^ (x >> 15)


@dataclass
class AlternatingFlip:
    """Alternating flip (Jordan 2024, "94% on CIFAR-10 in 3.29 Seconds", arXiv 2404.00498): in epoch 0 each
    image is flipped with probability 1/2; in every later epoch it is flipped exactly when it was not flipped in
    the epoch before, so each image is seen mirrored in every other epoch.

    Epoch 0's choice is a hash of the image's index and the seed the generator was seeded with, not a draw:
    nothing needs saving for a resumed run to replay it, and the generator's other draws are left untouched.
    """

    uses_index = True

    def first_epoch_flips(self, index: torch.Tensor, seed: int) -> torch.Tensor:
        low, high = torch.tensor(seed & _MASK32), torch.tensor((seed >> 32) & _MASK32)
        key = _mix32(low ^ _mix32(high))  # both halves of a 64-bit seed count
        return (_mix32((index.long() & _MASK32) ^ key.to(index.device)) & 1).bool()

    def sample(
        self, n: int, generator: torch.Generator, *, index: torch.Tensor | None = None, epoch: int | None = None
    ) -> dict[str, torch.Tensor]:
        if index is None or epoch is None:
            raise ConfigError(
                "altflip needs each image's dataset index and the epoch: use it through "
                "InMemoryLoader, or call Compose(...)(x, generator, index=..., epoch=...)"
            )
        if len(index) != n:
            raise ValueError(f"altflip: {len(index)} indices for a batch of {n} images")
        return {"flip": self.first_epoch_flips(index, generator.initial_seed()) ^ bool(epoch % 2)}

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        # a select instead of HorizontalFlip's index copy: no host sync for the count of flipped images
        return torch.where(p["flip"].to(x.device)[:, None, None, None], x.flip(3), x)


@dataclass
class Translate:
    """Shift by up to `max_shift` pixels in each direction, filling with zeros."""

    max_shift: int

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {
            "dy": _randint(-self.max_shift, self.max_shift, n, generator),
            "dx": _randint(-self.max_shift, self.max_shift, n, generator),
        }

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return shift_images(x, -p["dy"], -p["dx"])


@dataclass
class Cutout:
    """Zero a `size` x `size` square centred at a random pixel, clipped at the borders (DeVries & Taylor 2017)."""

    size: int

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"cy": torch.rand(n, generator=generator), "cx": torch.rand(n, generator=generator)}

    def apply(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        n, _, h, w = x.shape
        cy = (p["cy"] * h).long().to(x.device)  # centre row in [0, H)
        cx = (p["cx"] * w).long().to(x.device)
        top, left = cy - self.size // 2, cx - self.size // 2
        r = torch.arange(h, device=x.device)[None]
        c = torch.arange(w, device=x.device)[None]
        in_rows = (r >= top[:, None]) & (r < top[:, None] + self.size)
        in_cols = (c >= left[:, None]) & (c < left[:, None] + self.size)
        return x.masked_fill(in_rows[:, None, :, None] & in_cols[:, None, None, :], 0)


def sample_part(op, n: int, generator: torch.Generator, part: slice | None = None, total: int | None = None) -> dict:
    """`op`'s draws for a global batch of `total` images, sliced to this rank's `part` (all of them by default)."""
    if part is None:
        return op.sample(n, generator)
    return {k: v[part] for k, v in op.sample(total, generator).items()}


class Compose:
    def __init__(self, ops: list):
        self.ops = ops

    def __call__(
        self,
        x: torch.Tensor,
        generator: torch.Generator,
        part: slice | None = None,
        total: int | None = None,
        *,
        index: torch.Tensor | None = None,
        epoch: int | None = None,
    ) -> torch.Tensor:
        """Augment `x`. In a distributed run `x` is one rank's `part` of a global batch of `total` images:
        draws are made for the whole global batch and sliced, so every rank sees what one process would.
        `index` (the images' positions in the dataset) and `epoch` reach only the ops that use them, which
        draw nothing from the generator."""
        for op in self.ops:
            if getattr(op, "uses_index", False):
                x = op.apply(x, op.sample(x.shape[0], generator, index=index, epoch=epoch))
            else:
                x = op.apply(x, sample_part(op, x.shape[0], generator, part, total))
        return x

    def __bool__(self) -> bool:
        return bool(self.ops)

    def __repr__(self) -> str:
        return f"Compose({self.ops})"


def parse_augment(spec: str) -> Compose:
    """Parse 'crop:4:reflect,flip,cutout:8' into a Compose; an unknown name lists the valid ones."""
    ops: list = []
    for token in (t.strip() for t in (spec or "").split(",")):
        if not token or token == "none":
            continue
        name, *args = token.split(":")
        try:
            if name == "crop" and len(args) in (1, 2):
                mode = args[1] if len(args) == 2 else "zero"
                if mode not in ("zero", "reflect"):
                    raise ValueError
                ops.append(RandomCrop(int(args[0]), mode))
            elif name == "flip" and len(args) <= 1:
                ops.append(HorizontalFlip(float(args[0]) if args else 0.5))
            elif name == "altflip" and not args:
                ops.append(AlternatingFlip())
            elif name == "translate" and len(args) == 1:
                ops.append(Translate(int(args[0])))
            elif name == "cutout" and len(args) == 1:
                ops.append(Cutout(int(args[0])))
            else:
                raise ValueError
        except ValueError:
            raise ConfigError(f"bad augmentation {token!r}; {AUGMENT_HELP}") from None
    return Compose(ops)
