"""The weights that come with the package: each file against its registry entry, each model against its test
set, and the names wherever a run folder or weights file is taken."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cnnlab.cli import main
from cnnlab.errors import CheckpointError, ModelError
from cnnlab.inference.weights import load_weights, resolve_weights
from cnnlab.models import create_model, packaged
from cnnlab.models.packaged import get_packaged, list_packaged

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = list_packaged()
NAMES = [e.name for e in ENTRIES]
# where each dataset's real copy is found (tests/conftest.py); in CI a missing one fails instead of skipping
DATA_FIXTURE = {"cifar10": "shared_cifar10", "fashion-mnist": "fashion_mnist_dir", "mnist": "shared_mnist"}


def test_the_promised_weights_are_packaged():
    assert {"convnet-cifar10", "convnet-fashion-mnist", "resnet20-cifar10", "lenet5-mnist"} <= set(NAMES)
    assert "--recipe fast" in get_packaged("resnet20-cifar10").command


@pytest.mark.parametrize("name", NAMES)
def test_each_packaged_file_matches_its_registry_entry(name):
    entry = get_packaged(name)
    data = entry.path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry.sha256 and len(data) == entry.bytes < 2_000_000
    assert hashlib.sha256(entry.sidecar_path.read_bytes()).hexdigest() == entry.sidecar_sha256
    meta = json.loads(entry.sidecar_path.read_text())
    assert (meta["model"], meta["dataset"]) == (entry.model, entry.dataset) and name == f"{entry.model}-{entry.dataset}"
    # the recorded command is one that reproduces the file: cnnlab's own trainer, this model, this seed
    words = entry.command.split()
    assert words[:2] == ["cnnlab", "train"] and "--no-report" in words
    assert words[words.index("--seed") + 1] == str(entry.seed)
    assert words[words.index("--model") + 1] == entry.model
    assert entry.precision in ("fp32", "bf16") and entry.torch.startswith("2.")
    loaded = load_weights(name)
    assert sum(t.numel() for t in loaded.model.state_dict().values()) == sum(
        t.numel() for t in load_file(entry.path).values()
    )


@pytest.mark.integration
@pytest.mark.parametrize("name", NAMES)
def test_cnnlab_eval_of_a_packaged_name_repeats_its_test_accuracy(name, request, tmp_path, monkeypatch, capsys):
    entry = get_packaged(name)
    data_dir = request.getfixturevalue(DATA_FIXTURE[entry.dataset])
    monkeypatch.chdir(tmp_path)
    assert main(["eval", name, "--data-dir", str(data_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    # the registry's precision and test-time augmentation; 0.2% = 20 of 10,000 images may flip with thread
    # count and memory format
    assert (result["dataset"], result["n"], result["tta"]) == (entry.dataset, 10_000, entry.tta)
    assert result["accuracy"] == pytest.approx(entry.test_accuracy, abs=0.002)
    # written under ./eval/NAME, never into the installed package
    assert (tmp_path / "eval" / name / "eval.json").is_file()
    assert not (packaged.WEIGHTS_DIR / "eval.json").exists()


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_predict_and_viz_filters_take_a_packaged_name(photo, tmp_path, capsys):
    assert main(["predict", "resnet20-cifar10", str(photo), "--json", "--top-k", "10"]) == 0
    top = json.loads(capsys.readouterr().out)["results"][0]["top"]
    assert {t["class"] for t in top} == set(load_weights("resnet20-cifar10").classes)
    assert sum(t["probability"] for t in top) == pytest.approx(1, abs=1e-5)
    assert main(["viz", "filters", "convnet-cifar10", "--out", str(tmp_path / "viz")]) == 0
    assert "0: 5 filters of 3x3x3" in capsys.readouterr().out and (tmp_path / "viz" / "filters-0.png").is_file()


def test_an_unknown_name_lists_the_packaged_ones(photo, capsys):
    assert main(["predict", "resnet20-cifar100", str(photo)]) == 2
    err = capsys.readouterr().err
    assert "resnet20-cifar100: no such run folder or weights file, and no packaged weights of that name" in err
    assert all(name in err for name in NAMES)


def test_a_path_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet20-cifar10").mkdir()  # a run folder of the same name, not finished
    with pytest.raises(CheckpointError, match="no weights file .the run may not have finished"):
        resolve_weights("resnet20-cifar10")


def test_models_pretrained_lists_each_with_its_accuracy_and_command(capsys):
    assert main(["models", "--pretrained"]) == 0
    out = capsys.readouterr().out
    for entry in ENTRIES:
        assert f"{entry.test_accuracy:.2%}" in out and f"$ {entry.command}" in out
    assert main(["models", "--pretrained", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == json.loads((packaged.WEIGHTS_DIR / "registry.json").read_text())["weights"]


def test_create_model_loads_packaged_weights_by_dataset():
    model = create_model("resnet20", weights="cifar10")
    state = load_file(get_packaged("resnet20-cifar10").path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.pretrained_cfg["classes"][0] == "airplane" and model.pretrained_cfg["input_shape"] == [3, 32, 32]
    # the packaged model's own arguments come along: Fashion-MNIST's convnet takes one 28x28 channel
    fashion = create_model("convnet", weights="fashion-mnist")
    assert fashion(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert create_model("convnet", weights="convnet-fashion-mnist").pretrained_cfg["dataset"] == "fashion-mnist"


def test_create_model_still_takes_a_weights_file_and_names_what_is_packaged(tmp_path):
    torch.save(create_model("resnet20", num_classes=3).state_dict(), tmp_path / "mine.pth")
    assert create_model("resnet20", weights=tmp_path / "mine.pth", num_classes=3).fc.out_features == 3
    with pytest.raises(
        CheckpointError,
        match="weights='imagenet': no such file, and no packaged weights of that "
        "name; packaged for 'resnet20': cifar10",
    ):
        create_model("resnet20", weights="imagenet")
    with pytest.raises(ModelError, match="packaged weights 'resnet20-cifar10' do not fit num_classes=5 .they have 10."):
        create_model("resnet20", weights="cifar10", num_classes=5)


@pytest.fixture
def damaged_install(tmp_path, monkeypatch) -> Path:
    """A copy of the packaged weights that the tests may break; cnnlab reads it instead of the real one."""
    copy = tmp_path / "weights"
    shutil.copytree(packaged.WEIGHTS_DIR, copy)
    monkeypatch.setattr(packaged, "WEIGHTS_DIR", copy)
    return copy


def test_a_damaged_file_is_refused_and_says_to_reinstall(damaged_install, photo, capsys):
    path = damaged_install / "lenet5-mnist.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of one weight: a file that still parses, with a wrong value in it
    path.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError,
        match=r"lenet5-mnist.safetensors: sha256 \w{12}… but the registry of packaged "
        r"weights expects \w{12}…; the cnnlab install is damaged",
    ):
        load_weights("lenet5-mnist")
    with pytest.raises(CheckpointError, match="the cnnlab install is damaged"):
        create_model("lenet5", weights="mnist")
    assert main(["predict", "lenet5-mnist", str(photo)]) == 2
    assert "pip install --force-reinstall cnnlab" in capsys.readouterr().err
    load_weights("convnet-cifar10")  # the others still load


def test_a_changed_sidecar_or_a_missing_file_is_refused(damaged_install):
    sidecar = damaged_install / "convnet-cifar10.json"
    sidecar.write_text(sidecar.read_text().replace('"airplane"', '"aeroplane"'))
    with pytest.raises(CheckpointError, match="convnet-cifar10.json: sha256 .* the cnnlab install is damaged"):
        load_weights("convnet-cifar10")
    (damaged_install / "lenet5-mnist.safetensors").unlink()
    with pytest.raises(CheckpointError, match="packaged weights 'lenet5-mnist' cannot be read .No such file"):
        load_weights("lenet5-mnist")


@pytest.mark.slow
def test_a_built_wheel_contains_the_weights_and_their_registry(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "pyproject.toml", project)
    shutil.copy(ROOT / "README.md", project)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(project),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("cnnlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "cnnlab/weights/registry.json" in names
    for entry in ENTRIES:
        assert {f"cnnlab/weights/{entry.file}", f"cnnlab/weights/{entry.sidecar}"} <= names


@pytest.mark.integration
@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_of_a_packaged_model_agrees_with_predict_on_real_test_images(name, request, tmp_path):
    """Issue 14: onnxruntime and `cnnlab predict` agree on real images, top-1 and probabilities within 1e-3, at
    batch 1 and batch 64 through the same exported file."""
    pytest.importorskip("onnxruntime")
    from cnnlab.data.datasets import load_dataset
    from cnnlab.inference.export import compare_with_predict, export_model

    entry = get_packaged(name)
    data = load_dataset(entry.dataset, request.getfixturevalue(DATA_FIXTURE[entry.dataset]), log=lambda m: None)
    paths = []
    for i, image in enumerate(data.test_images[:64]):  # 64 real test images as the files a user would pass
        pixels = image.permute(1, 2, 0).numpy()
        path = tmp_path / f"{i:03d}.png"
        Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(path)
        paths.append(path)
    loaded = load_weights(name)
    exported = export_model(loaded, tmp_path / f"{name}.onnx", inputs=data.test_images[:64].float() / 255)
    report = compare_with_predict(exported.path, loaded, paths, precision="fp32")
    assert report["images"] == 64 and set(report["batches"]) == {1, 64}
    for batch in report["batches"].values():
        assert batch["top1_agree"] == 64 and batch["max_prob_diff"] <= 1e-3, report
