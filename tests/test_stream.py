import time

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from mixed_images import sample_numbers, write_mixed_folder, write_numbered_folder
from PIL import Image
from test_transforms import reference_eval

from cnnlab.data.imagefolder import decode_image_folder, image_folder_files
from cnnlab.data.stream import (
    FolderStreamLoader,
    TooManyBadImages,
    choose_data_mode,
    open_image_folder,
    parse_bytes,
    sample_channel_stats,
)
from cnnlab.errors import ConfigError

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def loader(source, split="train", batch=4, **kwargs):
    kwargs = {"image_size": 32, "mean": MEAN, "std": STD, **kwargs}
    return FolderStreamLoader(source, split, batch, **kwargs)


def unnormalise(x: torch.Tensor) -> np.ndarray:
    """Back to uint8 (N, H, W, C) pixels."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture
def mixed(tmp_path):
    write_mixed_folder(tmp_path / "mixed")
    return tmp_path / "mixed"


def test_training_batches_are_normalised_float_on_the_device_in_either_layout(mixed):
    source = open_image_folder(mixed)
    assert source.mode == "RGB" and source.classes == ["a", "b"] and source.count("train") == 18
    plain = list(loader(source, max_bad_images=2))
    last = list(loader(source, max_bad_images=2, channels_last=True, workers=2))
    assert len(plain) == 18 // 4
    for (x, y), (x_cl, y_cl) in zip(plain, last):
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
        assert y.dtype == torch.int64 and x.device == torch.device("cpu")
        assert x_cl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, x_cl) and torch.equal(y, y_cl)
    assert -2.6 < float(torch.cat([x for x, _ in plain]).min()) and float(torch.cat([x for x, _ in plain]).max()) < 2.6


def test_evaluation_batches_match_a_per_image_reference(mixed):
    source = open_image_folder(mixed)
    test = loader(source, "test", batch=2, workers=2, draft=False)
    xs, ys = zip(*test)
    assert len(test) == len(xs) == 3  # 5 test images in batches of 2
    pixels, labels = np.concatenate([unnormalise(x) for x in xs]), torch.cat(ys).tolist()
    files = [p for p in image_folder_files(mixed) if p.parts[-3] == "test"]
    assert labels == [0 if p.parent.name == "a" else 1 for p in files]
    for got, path in zip(pixels, files):
        with Image.open(path) as im:
            if im.mode == "RGBA":  # transparent pixels are composited over white
                im = Image.alpha_composite(Image.new("RGBA", im.size, (255,) * 4), im)
            ref = reference_eval(im.convert("RGB"), 32)
        assert np.abs(got.astype(int) - ref).max() <= 2, path
    # JPEG draft mode (the default) decodes t0.jpg at 1/2 scale: the same picture, not the same pixels
    drafted = np.concatenate([unnormalise(x) for x, _ in loader(source, "test", batch=2)])
    assert 0 < np.abs(drafted.astype(int) - pixels).mean() < 3


def test_resume_mid_epoch_replays_the_same_batches_whatever_the_workers(tmp_path):
    source = open_image_folder(write_image_folder(tmp_path / "f", per_class=(12, 2), size=20))
    straight = loader(source, batch=4, workers=2, seed=3)
    first_epoch = [x for x, _ in straight]
    second_epoch = [(x, y) for x, y in straight]
    assert not all(torch.equal(a, b) for a, (b, _) in zip(first_epoch, second_epoch))  # new order and crops
    interrupted = loader(source, batch=4, workers=2, seed=3)
    list(interrupted)
    for _, (_x, _y) in zip(range(3), interrupted):
        pass
    state = interrupted.state_dict()
    assert (state["epoch"], state["position"]) == (1, 3)
    state = torch.load(_roundtrip(state, tmp_path), weights_only=True)
    resumed = loader(source, batch=4, workers=0, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(second_epoch) - 3
    for (x, y), (x0, y0) in zip(rest, second_epoch[3:]):
        assert torch.equal(x, x0) and torch.equal(y, y0)
    assert (resumed.epoch, resumed.position) == (2, 0)


class _SlowSometimes:
    """An ImageTransform that sleeps up to 8 ms, differently per sample: workers finish out of turn."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, data, name, epoch, index, salt=0, **layout):
        time.sleep(((index * 7 + epoch * 3) % 5) * 0.002)
        return self.transform(data, name, epoch, index, salt, **layout)


def test_batches_through_shared_slots_equal_decoding_in_process_while_workers_race(tmp_path):
    """Workers return batches through a few reused shared-memory slots: none is overwritten before the main
    process has copied it out, also when workers finish out of turn and an epoch is abandoned half way."""
    source = open_image_folder(write_image_folder(tmp_path / "f", per_class=(30, 4), size=24))
    reference = loader(source, batch=4, workers=0, seed=5)
    expected = [[(x.clone(), y.clone()) for x, y in reference] for _ in range(3)]
    racing = loader(source, batch=4, workers=3, seed=5)
    assert racing._slots is not None and racing._slots.count == 2 * 3 + 2
    racing._dataset.transform = _SlowSometimes(racing._dataset.transform)
    kept = []
    for x, y in racing:  # the first epoch is abandoned after 5 batches, with tasks still in flight
        kept.append((x, y))
        if len(kept) == 5:
            break
    racing.epoch, racing.position = 0, 0  # and started again from its beginning
    got = [[(x, y) for x, y in racing] for _ in range(3)]
    for (x, y), (x0, y0) in zip(kept, expected[0]):
        assert torch.equal(x, x0) and torch.equal(y, y0)
    for epoch, (batches, reference_batches) in enumerate(zip(got, expected)):
        assert len(batches) == len(reference_batches) == 90 // 4
        for step, ((x, y), (x0, y0)) in enumerate(zip(batches, reference_batches)):
            assert torch.equal(x, x0) and torch.equal(y, y0), (epoch, step)
    evaluation = loader(source, "test", batch=3, workers=2)
    assert torch.equal(
        torch.cat([x for x, _ in evaluation]), torch.cat([x for x, _ in loader(source, "test", batch=3)])
    )


def _roundtrip(state, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_each_rank_takes_its_slice_of_every_global_batch(tmp_path):
    source = open_image_folder(write_image_folder(tmp_path / "f", per_class=(10, 3), size=20))
    whole = list(loader(source, batch=6, seed=1))
    ranks = [list(loader(source, batch=6, seed=1, rank=r, world_size=2, workers=1)) for r in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 5
    for i, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][i][0], ranks[1][i][0]]), x)
        assert torch.equal(torch.cat([ranks[0][i][1], ranks[1][i][1]]), y)


def test_evaluation_over_ranks_sees_every_image_once(tmp_path):
    source = open_image_folder(write_numbered_folder(tmp_path / "n", 3, 9))
    kwargs = {"image_size": 8, "mean": [0] * 3, "std": [1] * 3}
    ranks = [FolderStreamLoader(source, "test", 4, rank=r, world_size=2, **kwargs) for r in range(2)]
    seen = [[n for x, _ in rank for n in sample_numbers(x)] for rank in ranks]
    # each rank a consecutive share of the split (4 and 5 of 9 images, in batches of 2), so that the shares
    # joined in rank order are the split's order: files sorted by class, 0 3 6 | 1 4 7 | 2 5 8
    assert [len(r) for r in ranks] == [2, 3]
    assert seen == [[0, 3, 6, 1], [4, 7, 2, 5, 8]]


def test_a_batch_size_the_world_size_does_not_divide_is_refused(tmp_path):
    source = open_image_folder(write_image_folder(tmp_path / "f", per_class=(4, 1), size=8))
    with pytest.raises(
        ConfigError,
        match=r"batch size 10 cannot be split evenly over 4 processes; "
        r"choose a multiple of 4 \(e.g. 8\)",
    ):
        loader(source, batch=10, world_size=4, rank=1)


def test_bad_images_are_skipped_counted_named_and_limited(mixed):
    source = open_image_folder(mixed)
    train = loader(source, batch=6, max_bad_images=2, workers=2)
    batches = list(train)
    assert [x.shape[0] for x, _ in batches] == [6, 6, 6]  # failed samples filled: shapes stay fixed
    bad = {b["file"]: b["error"] for b in train.bad_images}
    assert sorted(bad) == [str(mixed / "train" / "a" / "corrupt.jpg"), str(mixed / "train" / "b" / "truncated.jpg")]
    assert all("not a readable image" in e for e in bad.values())
    list(train)  # a second epoch meets the same files: still counted once each
    assert train.bad_count == 2 and train.state_dict()["bad_images"]
    strict = loader(source, batch=6, max_bad_images=1)
    with pytest.raises(
        TooManyBadImages, match=r"2 unreadable images, more than the 1 allowed .* raise --max-bad-images"
    ):
        list(strict)
    # the default threshold is 0.1% of the split, at least one image
    assert loader(source).max_bad_images == 1


def test_evaluation_drops_unreadable_images(tmp_path):
    write_mixed_folder(tmp_path / "m")
    (tmp_path / "m" / "test" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    test = loader(open_image_folder(tmp_path / "m"), "test", batch=4)
    assert sum(len(y) for _, y in test) == 5 and test.bad_count == 1


def test_greyscale_folder_streams_one_channel(tmp_path):
    for split in ("train", "test"):
        for c in ("x", "y"):
            (tmp_path / "g" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((30, 20), 40 * i, np.uint8)).save(tmp_path / "g" / split / c / f"{i}.png")
    source = open_image_folder(tmp_path / "g")
    assert source.mode == "L"
    x, y = next(iter(FolderStreamLoader(source, "train", 2, image_size=16, mean=[0.5], std=[0.5])))
    assert x.shape == (2, 1, 16, 16)


def test_choose_data_mode_says_why(tmp_path, mixed):
    mode, reason = choose_data_mode(mixed)
    assert mode == "stream" and "no readable header" in reason  # the corrupt file
    uniform = write_image_folder(tmp_path / "u", per_class=(4, 2), size=16)
    assert choose_data_mode(uniform) == (
        "memory",
        "data mode memory: 18 images of 3x16x16 decode to 13.5 KiB, within the 2.0 GiB memory budget (--memory-budget)",
    )
    mode, reason = choose_data_mode(uniform, budget=parse_bytes("10KB"))
    assert mode == "stream" and "over the 9.8 KiB memory budget" in reason
    mode, reason = choose_data_mode(uniform, image_size=64, budget=parse_bytes("100KB"))
    assert mode == "stream" and "18 decoded images of 3x64x64 need 216.0 KiB" in reason
    assert choose_data_mode(uniform, "stream")[0] == "stream"
    sizes = write_mixed_folder(tmp_path / "s", bad=False)
    assert "differ in size" in choose_data_mode(sizes["cmyk"].parents[2])[1]


def test_parse_bytes():
    assert parse_bytes("256MB") == 256_000_000 and parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes("512") == 512
    with pytest.raises(ConfigError, match="'lots' is not a size"):
        parse_bytes("lots")


def test_memory_mode_resizes_to_the_image_size_and_applies_exif(tmp_path):
    files = write_mixed_folder(tmp_path / "m", bad=False)
    root = tmp_path / "m"
    arrays, classes, _, _ = decode_image_folder(root, image_folder_files(root), image_size=24, log=lambda m: None)
    assert arrays["train_images"].shape == (16, 3, 24, 24) and arrays["test_images"].shape == (5, 3, 24, 24)
    rotated = image_folder_files(root).index(files["rotated"])  # train files come first
    top, bottom = arrays["train_images"][rotated][:, 1, 12], arrays["train_images"][rotated][:, -2, 12]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red above blue: upright


def test_sampled_channel_stats_of_a_numbered_folder(tmp_path):
    source = open_image_folder(write_numbered_folder(tmp_path / "n", 20, 2))
    mean, std = sample_channel_stats(source, 8, n=20)
    red = np.arange(20) / 255
    assert np.allclose(mean, [red.mean(), 0, 7 / 255], atol=1e-6) and np.allclose(std[0], red.std(), atol=1e-6)


def test_numbered_samples_each_seen_once_per_epoch(tmp_path):
    source = open_image_folder(write_numbered_folder(tmp_path / "n", 24, 2))
    seen = [
        n
        for x, _ in FolderStreamLoader(source, "train", 8, image_size=8, mean=[0] * 3, std=[1] * 3, workers=2)
        for n in sample_numbers(x)
    ]
    assert sorted(seen) == list(range(24))
