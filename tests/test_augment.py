"""Each batched augmentation equals a per-image reference loop under the same random draws."""

import pytest
import torch
import torch.nn.functional as F

from cnnlab.data import InMemoryLoader, split_validation
from cnnlab.data.augment import Cutout, HorizontalFlip, RandomCrop, Translate, parse_augment
from cnnlab.errors import ConfigError


@pytest.fixture
def batch():
    return torch.randint(0, 256, (16, 3, 10, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["zero", "reflect"])
def test_random_crop_matches_pad_then_crop_per_image(batch, mode):
    crop = RandomCrop(3, mode)
    params = crop.sample(len(batch), torch.Generator().manual_seed(1))
    out = crop.apply(batch, params)
    for i, img in enumerate(batch):
        padded = F.pad(img.float()[None], (3, 3, 3, 3), mode="constant" if mode == "zero" else "reflect")[0]
        dy, dx = int(params["dy"][i]), int(params["dx"][i])
        assert torch.equal(out[i].float(), padded[:, dy : dy + 10, dx : dx + 12])


def test_flip_matches_per_image(batch):
    flip = HorizontalFlip()
    params = flip.sample(len(batch), torch.Generator().manual_seed(2))
    out = flip.apply(batch, params)
    assert 0 < params["flip"].sum() < len(batch)
    for i, img in enumerate(batch):
        assert torch.equal(out[i], img.flip(-1) if params["flip"][i] else img)


def test_translate_matches_per_image(batch):
    translate = Translate(4)
    params = translate.sample(len(batch), torch.Generator().manual_seed(3))
    out = translate.apply(batch, params)
    for i, img in enumerate(batch):
        dy, dx = int(params["dy"][i]), int(params["dx"][i])
        expected = torch.zeros_like(img)
        h, w = img.shape[1:]
        expected[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
            :, max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
        ]
        assert torch.equal(out[i], expected)


def test_cutout_matches_per_image(batch):
    cutout = Cutout(5)
    params = cutout.sample(len(batch), torch.Generator().manual_seed(4))
    out = cutout.apply(batch, params)
    for i, img in enumerate(batch):
        cy, cx = int(params["cy"][i] * 10), int(params["cx"][i] * 12)
        expected = img.clone()
        expected[:, max(cy - 2, 0) : cy + 3, max(cx - 2, 0) : cx + 3] = 0
        assert torch.equal(out[i], expected)


def test_parse_augment():
    ops = parse_augment("crop:4:reflect, flip, translate:2, cutout:8").ops
    assert ops == [RandomCrop(4, "reflect"), HorizontalFlip(0.5), Translate(2), Cutout(8)]
    assert not parse_augment("none")
    with pytest.raises(ConfigError, match="bad augmentation 'crop:4:wrap'"):
        parse_augment("crop:4:wrap")
    with pytest.raises(ConfigError, match="bad augmentation 'rotate'"):
        parse_augment("rotate")


def _loader(n=50, batch_size=8, **kw):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return InMemoryLoader(images, torch.arange(n), batch_size, mean=[0.0], std=[1 / 255], **kw)


def test_loader_normalises_and_keeps_every_example_once_per_epoch():
    loader = _loader(shuffle=True, seed=3)
    assert len(loader) == 7
    labels = torch.cat([y for _, y in loader])
    assert sorted(labels.tolist()) == list(range(50))
    x, y = next(iter(loader))
    assert torch.equal(x[:, 0, 0, 0], y.float())  # (v / 255 - 0) / (1 / 255) == v


def test_loader_drop_last_and_reproducible_shuffle():
    loader = _loader(shuffle=True, drop_last=True, seed=3)
    assert len(loader) == 6 and all(len(y) == 8 for _, y in loader)
    a = [y.tolist() for _, y in _loader(shuffle=True, seed=3)]
    b = [y.tolist() for _, y in _loader(shuffle=True, seed=3)]
    epoch2 = [y.tolist() for _ in range(2) for _, y in [*_loader(shuffle=True, seed=3)]]
    assert a == b and a != [y.tolist() for _, y in _loader(shuffle=True, seed=4)]
    assert epoch2  # two passes work


@pytest.mark.parametrize("channels_last", [False, True])
def test_loader_crop_path_equals_the_batched_reference(batch, channels_last):
    """The loader pads its dataset once and selects windows; the result equals RandomCrop.apply per batch."""
    labels = torch.arange(len(batch))
    loader = InMemoryLoader(
        batch,
        labels,
        5,
        mean=[0.0] * 3,
        std=[1 / 255] * 3,
        shuffle=True,
        seed=7,
        augment=parse_augment("crop:3:reflect,flip"),
        channels_last=channels_last,
    )
    order_gen, aug_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)
    order = torch.randperm(len(batch), generator=order_gen)
    crop, flip = RandomCrop(3, "reflect"), HorizontalFlip()
    for i, (x, y) in enumerate(loader):
        idx = order[i * 5 : (i + 1) * 5]
        expected = crop.apply(batch[idx], crop.sample(len(idx), aug_gen))
        expected = flip.apply(expected, flip.sample(len(idx), aug_gen))
        assert torch.equal(y, labels[idx]) and torch.equal(x, expected.float())
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_loader_state_dict_resumes_mid_epoch_with_the_same_batches_and_augmentations():
    reference = _loader(shuffle=True, seed=5, augment=parse_augment("crop:1:reflect,translate:1,flip"))
    seen = [x for _ in range(2) for x, _ in reference]
    interrupted = _loader(shuffle=True, seed=5, augment=parse_augment("crop:1:reflect,translate:1,flip"))
    it = iter(interrupted)
    first = [next(it)[0] for _ in range(3)]
    state = interrupted.state_dict()
    resumed = _loader(shuffle=True, seed=5, augment=parse_augment("crop:1:reflect,translate:1,flip"))
    resumed.load_state_dict(state)
    rest = [x for x, _ in resumed] + [x for x, _ in resumed]
    assert resumed.epoch == 2
    assert all(torch.equal(a, b) for a, b in zip(seen, first + rest)) and len(first + rest) == len(seen)


def test_validation_split_is_fixed_by_its_seed():
    images, labels = torch.zeros(100, 1, 2, 2, dtype=torch.uint8), torch.arange(100)
    _, train_y, _, val_y = split_validation(images, labels, 0.2, seed=0)
    _, _, _, val_again = split_validation(images, labels, 0.2, seed=0)
    assert len(val_y) == 20 and len(train_y) == 80 and torch.equal(val_y, val_again)
    assert not set(val_y.tolist()) & set(train_y.tolist())
