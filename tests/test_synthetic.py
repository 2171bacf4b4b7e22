"""The synthetic datasets: the same bytes from the same recipe, real datasets' shapes, learnable classes that
survive a flip, and labelled as synthetic wherever a user looks."""

import json

import pytest
import torch

from cnnlab import TrainConfig, fit
from cnnlab.cli import main as cli
from cnnlab.data import get_spec, load_dataset
from cnnlab.data.synthetic import make_synthetic
from cnnlab.errors import ConfigError


def small(**kw):
    return make_synthetic(**{"shape": (3, 16, 16), "num_classes": 4, "train": 40, "test": 12, **kw})


def test_the_same_recipe_gives_the_same_bytes_and_another_seed_other_bytes():
    a, b, other = small(), small(), small(seed=1)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.files == b.files
    assert not torch.equal(a.train_images, other.train_images)
    assert a.files[0]["sha256"] != other.files[0]["sha256"]  # the recipe is the data's identity in fingerprints


def test_shapes_dtypes_balanced_labels_and_names():
    data = small()
    assert data.train_images.shape == (40, 3, 16, 16) and data.test_images.shape == (12, 3, 16, 16)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert torch.bincount(data.train_labels).tolist() == [10, 10, 10, 10]
    assert torch.bincount(data.test_labels).tolist() == [3, 3, 3, 3]
    assert data.classes == ["pattern0", "pattern1", "pattern2", "pattern3"]
    assert 20 <= data.train_images.min() and data.train_images.max() <= 236  # never clipped
    assert data.synthetic and "SYNTHETIC" in data.describe() and "not real" in data.source


def test_classes_are_separable_and_survive_a_horizontal_flip():
    data = make_synthetic(shape=(3, 32, 32), num_classes=10, train=500, test=200)
    means = torch.stack([data.train_images[data.train_labels == k].float().mean(0) for k in range(10)])

    def nearest_mean(images):
        return torch.cdist(images.float().flatten(1), means.flatten(1)).argmin(1)

    assert (nearest_mean(data.test_images) == data.test_labels).float().mean() >= 0.95
    assert (nearest_mean(data.test_images.flip(3)) == data.test_labels).float().mean() >= 0.95


def test_bad_sizes_are_refused():
    with pytest.raises(ConfigError, match=r"0 train and 12 test images: every number must be at least 1"):
        small(train=0)


def test_the_named_datasets_have_the_shapes_of_the_real_ones():
    data = load_dataset("synthetic-cifar")
    assert (len(data.train_labels), len(data.test_labels), data.shape) == (50_000, 10_000, (3, 32, 32))
    assert data.files[0]["status"] == "synthetic" and len(data.classes) == 10
    spec = get_spec("synthetic-imagenet")  # 1 GB to generate: its spec is enough here
    assert spec.shape == (3, 224, 224) and len(spec.classes) == 1000 and "SYNTHETIC" in spec.description


def test_fit_learns_synthetic_cifar_and_the_summary_says_it_is_synthetic(tmp_path):
    cfg = TrainConfig(
        model="cnn",
        model_args={"spec": "c8,p,c16,p,f32"},
        dataset="synthetic-cifar",
        train_subset=512,
        batch_size=32,
        epochs=2,
        optimizer="adamw",
        lr=3e-3,
        precision="fp32",
        channels_last="off",
        progress="none",
        report=False,
        run_dir=str(tmp_path / "run"),
    )
    summary = fit(cfg, log=lambda m: None)
    assert summary["test_accuracy"] >= 0.9  # 10 classes, chance 0.1; 1.0 when written
    assert summary["augment"] == "crop:4:reflect,flip"  # CIFAR's default augmentation
    assert summary["dataset"]["name"] == "synthetic-cifar" and "not real images" in summary["dataset"]["source"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["dataset"]["files"][0]["status"] == "synthetic"


def test_the_cli_lists_them_and_has_nothing_to_fetch(capsys):
    assert cli(["data", "list"]) == 0
    listing = capsys.readouterr().out
    assert "synthetic-cifar" in listing and "synthetic-imagenet" in listing and "nothing to download" in listing
    assert cli(["data", "fetch", "synthetic-cifar"]) == 0
    assert "generated in memory whenever it is used; there is nothing to fetch" in capsys.readouterr().out
