import hashlib
import json
import tarfile

import numpy as np
import pytest
import torch
from hostile import sample, small_jpeg, tar_member, write_shards
from mixed_images import sample_numbers, write_mixed_folder, write_numbered_folder

from cnnlab.cli import main
from cnnlab.data.imagefolder import image_folder_files
from cnnlab.data.shards import ShardLoader, open_shards, pack_image_folder
from cnnlab.data.stream import TooManyBadImages, sample_channel_stats
from cnnlab.errors import DatasetError

PLAIN = {"mean": [0] * 3, "std": [1] * 3}


def shard_members(folder) -> dict[str, bytes]:
    members = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                members[f"{path.name}:{m.name}"] = tar.extractfile(m).read()
    return members


def test_pack_keeps_every_file_byte_for_byte_with_its_class(tmp_path):
    root = tmp_path / "mixed"
    write_mixed_folder(root)
    manifest = pack_image_folder(root, tmp_path / "out", shard_size="8KB", log=lambda m: None)
    members = shard_members(tmp_path / "out")
    files = image_folder_files(root)
    images = {k: v for k, v in members.items() if not k.endswith(".cls")}
    assert sorted(images.values()) == sorted(p.read_bytes() for p in files)  # the original bytes, no re-encoding
    by_bytes = {p.read_bytes(): p for p in files}
    for name, data in images.items():
        label = members[name.rsplit(".", 1)[0] + ".cls"]
        assert int(label) == "ab".index(by_bytes[data].parent.name)
        assert name.split(":")[0].startswith(by_bytes[data].parts[-3])  # train file in a train shard
        assert name.rsplit(".", 1)[1] == by_bytes[data].suffix[1:]  # the file's own extension
    assert manifest["counts"] == {"train": 18, "test": 5} and manifest["classes"] == ["a", "b"]
    assert manifest["mode"] == "RGB" and manifest["version"] == 1
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    for split in ("train", "test"):
        shards = manifest["splits"][split]["shards"]
        assert len(shards) > 1 and sum(s["samples"] for s in shards) == manifest["counts"][split]
        for s in shards:
            data = (tmp_path / "out" / s["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    again = pack_image_folder(root, tmp_path / "again", shard_size="8KB", log=lambda m: None)
    assert again["splits"] == manifest["splits"]  # deterministic: same order, same bytes, same hashes


def test_cli_data_pack(tmp_path, capsys):
    root = write_numbered_folder(tmp_path / "n", 12, 3)
    assert main(["data", "pack", str(root), str(tmp_path / "out"), "--shard-size", "2KB"]) == 0
    out = capsys.readouterr().out
    assert "train: 12 images in" in out and "15 images of 3 classes packed into" in out
    assert open_shards(tmp_path / "out").count("train") == 12
    assert main(["data", "pack", str(root)]) == 2
    assert "'cnnlab data pack ROOT OUT'" in capsys.readouterr().err


def train_loader(source, batch, **kwargs):
    return ShardLoader(source, "train", batch, image_size=8, **PLAIN, **kwargs)


def test_every_sample_once_per_epoch_across_two_ranks_of_two_workers(tmp_path):
    root = write_numbered_folder(tmp_path / "n", 48, 10)
    pack_image_folder(root, tmp_path / "out", shard_size="3KB", log=lambda m: None)
    source = open_shards(tmp_path / "out")
    assert len(source.shards("train")) >= 8
    seen = []
    for epoch in range(2):
        ranks = [train_loader(source, 8, rank=r, world_size=2, workers=2, shuffle_buffer=5, seed=1) for r in range(2)]
        for rank in ranks:
            rank.epoch = epoch
        numbers = [[n for x, _ in rank for n in sample_numbers(x)] for rank in ranks]
        assert [len(r) for r in ranks] == [6, 6]  # 48 samples / (2 ranks x 2 streams x 4) = 3 batches a stream
        assert sorted(numbers[0] + numbers[1]) == list(range(48))
        seen.append(numbers)
    assert seen[0] != seen[1]  # a new shard order and shuffle each epoch
    # samples that do not fill a batch on every rank are left out, the same number on every rank
    uneven = [train_loader(source, 8, rank=r, world_size=2, workers=2, streams=5) for r in range(2)]
    numbers = [[n for x, _ in rank for n in sample_numbers(x)] for rank in uneven]
    assert [len(r) for r in uneven] == [5, 5]  # 48 // (2 ranks x 5 streams x 4) = 1 batch a stream
    assert len(numbers[0] + numbers[1]) == len(set(numbers[0] + numbers[1])) == 40


def test_evaluation_reads_each_test_sample_once_in_order(tmp_path):
    root = write_numbered_folder(tmp_path / "n", 6, 11)
    pack_image_folder(root, tmp_path / "out", shard_size="2KB", log=lambda m: None)
    source = open_shards(tmp_path / "out")
    ranks = [ShardLoader(source, "test", 4, image_size=8, **PLAIN, rank=r, world_size=2, workers=1) for r in range(2)]
    numbers = [[n for x, _ in rank for n in sample_numbers(x)] for rank in ranks]
    expected = sorted(range(11), key=lambda i: (i % 3, i))  # packed sorted by path: class folder, then name
    assert numbers == [expected[:5], expected[5:]] and [len(r) for r in ranks] == [3, 3]  # 2 a rank


def test_resume_from_shards_replays_the_rest_of_the_epoch_bitwise(tmp_path):
    root = write_mixed_folder(tmp_path / "m", bad=False)["cmyk"].parents[2]
    pack_image_folder(root, tmp_path / "out", shard_size="6KB", log=lambda m: None)
    source = open_shards(tmp_path / "out")
    kwargs = {"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "shuffle_buffer": 4, "seed": 2}
    straight = ShardLoader(source, "train", 2, workers=2, **kwargs)
    list(straight)
    reference = list(straight)  # the second epoch
    interrupted = ShardLoader(source, "train", 2, workers=2, **kwargs)
    list(interrupted)
    for _ in zip(range(3), interrupted):
        pass
    state = interrupted.state_dict()
    assert (state["epoch"], state["position"], state["streams"], state["samples_consumed"]) == (1, 3, 2, 6)
    torch.save(state, tmp_path / "state.pt")
    for workers in (2, 0, 1):
        resumed = ShardLoader(source, "train", 2, workers=workers, **kwargs)
        resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        rest = list(resumed)
        assert len(rest) == len(reference) - 3 == 5
        for (x, y), (x0, y0) in zip(rest, reference[3:]):
            assert torch.equal(x, x0) and torch.equal(y, y0)


def test_a_corrupt_shard_is_named_with_the_fix(tmp_path):
    root = write_numbered_folder(tmp_path / "n", 12, 3)
    manifest = pack_image_folder(root, tmp_path / "out", shard_size="4KB", log=lambda m: None)
    first = tmp_path / "out" / manifest["splits"]["train"]["shards"][0]["name"]
    data = bytearray(first.read_bytes())
    data[700] ^= 0xFF  # one flipped bit-pattern inside an image member: same size, other hash
    first.write_bytes(bytes(data))
    source = open_shards(tmp_path / "out")
    with pytest.raises(
        DatasetError,
        match=rf"{first}: sha256 \w+\.\.\. differs from the manifest's \w+\.\.\.; "
        r"the shard is corrupt: copy it again, or re-run 'cnnlab data pack",
    ):
        list(train_loader(source, 2, workers=1, max_bad_images=12))
    first.write_bytes(bytes(data[:-1024]))
    with pytest.raises(DatasetError, match=rf"{first}: [\d,]+ bytes, the manifest says [\d,]+; the shard is truncated"):
        open_shards(tmp_path / "out")
    (tmp_path / "out" / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="holds no packed shards; pack them again with 'cnnlab data pack"):
        open_shards(tmp_path / "out")


def test_bad_images_in_shards_are_named_and_limited(tmp_path):
    root = write_mixed_folder(tmp_path / "m")["cmyk"].parents[2]
    pack_image_folder(root, tmp_path / "out", log=lambda m: None)
    source = open_shards(tmp_path / "out")
    train = ShardLoader(source, "train", 3, image_size=16, **PLAIN, max_bad_images=2, workers=2)
    assert [len(y) for _, y in train] == [3] * 6  # failed samples filled: shapes stay fixed
    names = sorted(b["file"].split(":")[1].split("_", 1)[1] for b in train.bad_images)
    assert names == ["corrupt.jpg", "truncated.jpg"]  # the key keeps the original file name
    with pytest.raises(TooManyBadImages, match="2 unreadable images, more than the 1 allowed"):
        list(ShardLoader(source, "train", 6, image_size=16, **PLAIN, max_bad_images=1))


def test_too_few_samples_for_every_rank_is_refused(tmp_path):
    root = write_numbered_folder(tmp_path / "n", 12, 3)
    pack_image_folder(root, tmp_path / "out", log=lambda m: None)
    with pytest.raises(DatasetError, match="12 training samples cannot give each of 2 process"):
        train_loader(open_shards(tmp_path / "out"), 8, world_size=2, workers=2)


def test_channel_stats_from_shards(tmp_path):
    root = write_numbered_folder(tmp_path / "n", 20, 2)
    pack_image_folder(root, tmp_path / "out", log=lambda m: None)
    mean, std = sample_channel_stats(open_shards(tmp_path / "out"), 8, n=20)
    red = np.arange(20) / 255
    assert np.allclose(mean, [red.mean(), 0, 7 / 255], atol=1e-6) and np.allclose(std[0], red.std(), atol=1e-6)


# ---------------------------------------------------------------- hostile shards (issue 21)


def train_epoch(folder):
    return list(train_loader(open_shards(folder), 1))


@pytest.mark.parametrize("label", ["999", "3", "-1", "-100", str(2**70), "x", ""])
def test_a_label_outside_the_manifests_classes_is_refused_by_name(tmp_path, label):
    """The loss took -100 as "ignore", failed on 999 with an IndexError and on 2**70 with an OverflowError."""
    folder = write_shards(
        tmp_path / "s", [sample(f"{i:08d}_x", label if i == 1 else "0", small_jpeg(i)) for i in range(2)]
    )
    shown = (
        rf"label {label} is not one of the manifest's 3 classes \(0 to 2\)"
        if label.lstrip("-").isdigit()
        else rf"label b'{label}' is not a class index"
    )
    with pytest.raises(
        DatasetError,
        match=rf"train-000000\.tar:00000001_x\.cls: {shown}; copy it again, or "
        r"re-run 'cnnlab data pack",
    ):
        train_epoch(folder)


def test_a_key_seen_twice_is_refused(tmp_path):
    folder = write_shards(tmp_path / "s", [sample(f"{i:08d}_x", "0", small_jpeg(i)) for i in (0, 1, 0)])
    with pytest.raises(
        DatasetError,
        match=r"train-000000\.tar: key '00000000_x' appears twice \('00000000_x\.cls'\); "
        "a shard holds each sample once",
    ):
        train_epoch(folder)
    two_labels = write_shards(
        tmp_path / "t", [sample("00000000_x", "0", small_jpeg()) + tar_member("00000000_x.cls", b"1")]
    )
    with pytest.raises(DatasetError, match=r"00000000_x\.cls: a second \.cls member for one sample"):
        train_epoch(two_labels)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"mode": "CMYK"}, r"mode 'CMYK', expected 'RGB' or 'L'"),
        (
            {"classes": [str(i) for i in range(100_001)]},
            r"lists 100,001 classes, more than cnnlab trains on \(100,000\); .*, or raise CNNLAB_MAX_CLASSES$",
        ),
        ({"classes": []}, r"'classes' must be a non-empty list of class names"),
        ({"classes": ["a", "a"]}, r"a class is listed twice"),
        (
            {
                "splits": {
                    "train": {
                        "samples": 1,
                        "shards": [{"name": "../../etc/passwd", "samples": 1, "bytes": 1, "sha256": ""}],
                    }
                }
            },
            r"a train shard entry is malformed \(each needs a name like train-000000\.tar",
        ),
    ],
)
def test_a_manifests_classes_mode_and_shards_are_validated(tmp_path, change, message):
    folder = write_shards(tmp_path / "s", [sample("00000000_x", "0", small_jpeg())])
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, **change}))
    with pytest.raises(DatasetError, match=rf"manifest\.json: {message}"):
        open_shards(folder)


def test_the_shuffle_buffer_keeps_its_byte_budget_and_every_sample(tmp_path, monkeypatch):
    """With a budget of two samples' bytes, the buffer still emits every sample once per epoch."""
    folder = write_shards(
        tmp_path / "s",
        [
            tar_member(f"{i:08d}_x.cls", str(i % 3).encode()) + tar_member(f"{i:08d}_x.jpg", small_jpeg(i), 1 << 20)
            for i in range(12)
        ],
    )
    monkeypatch.setenv("CNNLAB_SHUFFLE_BUFFER_BYTES", "2MiB")
    loader = train_loader(open_shards(folder), 1)
    labels = sorted(int(y) for _, y in loader)
    assert labels == sorted(i % 3 for i in range(12)) and loader.bad_images == []
