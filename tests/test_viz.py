"""Filters, feature maps, the run report and the viz commands, on a model trained by `cnnlab train`."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from cnnlab.errors import ModelError
from cnnlab.models import create_model
from cnnlab.viz.filters import (
    default_feature_layers,
    feature_maps,
    filter_images,
    layer_kinds,
    layer_weight,
    plot_feature_maps,
    plot_filters,
)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # commands that write to ./viz by default write here, never into the repository


def cnnlab(*args, env=None, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "cnnlab", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A model with 7x7 first-layer filters, trained through the CLI, report included."""
    from conftest import write_image_folder

    tmp = tmp_path_factory.mktemp("viz")
    root = write_image_folder(tmp / "shapes", per_class=(40, 10), size=24)
    env = {"CNNLAB_CACHE": str(tmp / "cache")}
    result = cnnlab(
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        root,
        "--model",
        "cnn",
        "--model-arg",
        "spec=c16k7,p,c16,p,f32",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--run-dir",
        tmp / "run",
        "--progress",
        "none",
        env=env,
    )
    assert "report: " in result.stdout
    image = tmp / "one.png"
    shutil.copy(next((root / "test" / "circle").iterdir()), image)
    return tmp / "run", image, env


def test_first_layer_filters_scaled_each_to_unit_range_in_colour():
    weight = torch.randn(6, 3, 5, 5)
    images = filter_images(weight)
    assert images.shape == (6, 5, 5, 3)
    assert np.allclose(images.reshape(6, -1).min(1), 0) and np.allclose(images.reshape(6, -1).max(1), 1)
    # scaling keeps the order of the weights within a filter
    assert np.array_equal(np.argsort(images[2].ravel()), np.argsort(weight[2].permute(1, 2, 0).numpy().ravel()))
    assert filter_images(torch.randn(4, 1, 3, 3)).shape == (4, 3, 3)  # grey for 1-channel input
    assert filter_images(torch.randn(4, 8, 3, 3), first_layer=False).shape == (4, 8, 3, 3)  # a row per output


@pytest.mark.parametrize("name", ["convnet", "resnet18", "resnet20", "alexnet", "plain20", "resnext50_32x4d"])
def test_filters_of_registered_models_plot(name, tmp_path):
    model = create_model(name)
    layer, weight = layer_weight(model)
    assert weight.ndim == 4
    plot_filters(weight, tmp_path / "first.png", layer=layer)
    deeper = list(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))[-1]
    _, w2 = layer_weight(model, deeper)
    plot_filters(w2, tmp_path / "deep.png", layer=deeper, first_layer=False)
    assert Image.open(tmp_path / "first.png").size[0] > 100 and Image.open(tmp_path / "deep.png").size[0] > 100


def test_bad_layer_and_model_without_convolutions_are_named():
    with pytest.raises(ModelError, match=r"no convolution layer 'layer9'; valid layers: conv1, layer1.0.conv1"):
        layer_weight(create_model("resnet18"), "layer9")
    with pytest.raises(ModelError, match="has no convolution layer"):
        layer_weight(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_feature_maps_capture_the_named_layers_and_remove_their_hooks():
    model = create_model("resnet20")
    maps = feature_maps(model, torch.randn(1, 3, 32, 32), ["conv1", "layer2.0", "layer3"])
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "conv1": (1, 16, 32, 32),
        "layer2.0": (1, 32, 16, 16),
        "layer3": (1, 64, 8, 8),
    }
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ModelError, match="no layer 'nope'; valid layers: conv1, bn1"):
        feature_maps(model, torch.randn(1, 3, 32, 32), ["nope"])

    class Broken(nn.Module):  # a forward that fails must not leave hooks behind either
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).view(-1, 7)

    broken = Broken()
    with pytest.raises(RuntimeError):
        feature_maps(broken, torch.randn(1, 3, 8, 8), ["conv"])
    assert not broken.conv._forward_hooks


def test_the_viz_commands_on_a_trained_run(run, tmp_path):
    run_dir, image, env = run
    out = cnnlab("viz", "filters", run_dir, env=env).stdout
    assert "0: 16 filters of 3x7x7" in out and (run_dir / "viz" / "filters-0.png").is_file()
    assert "3: 16 filters of 16x3x3" in cnnlab("viz", "filters", run_dir, "--layer", "3", env=env).stdout
    out = cnnlab("viz", "features", run_dir, image, "--layers", "0,2,3", env=env).stdout
    assert "0: (1, 16, 24, 24)" in out and "2: (1, 16, 12, 12)" in out
    out = cnnlab("viz", "gabor", run_dir, "--out", tmp_path, env=env).stdout
    result = json.loads((tmp_path / "gabor.json").read_text())
    assert result["n_filters"] == 16 and "Gabor fits of 16 first-layer filters (3x7x7" in out
    assert (tmp_path / "v1_comparison.png").is_file() and (tmp_path / "gabor_fits.png").is_file()


def test_viz_bad_input_gets_clear_messages(run, tmp_path):
    run_dir, image, env = run
    bad = cnnlab("viz", "filters", run_dir, "--layer", "fc9", env=env, check=False)
    assert bad.returncode == 2 and "no convolution layer 'fc9'; valid layers: 0, 3" in bad.stderr
    (tmp_path / "not.png").write_text("hello")
    bad = cnnlab("viz", "features", run_dir, tmp_path / "not.png", env=env, check=False)
    assert bad.returncode == 2 and "not.png: not a readable image" in bad.stderr
    bad = cnnlab("viz", "features", run_dir, image, "--layers", "99", env=env, check=False)
    assert bad.returncode == 2 and "no layer '99'; valid layers: 0, 1, 2" in bad.stderr
    assert "9: (1, 3)" in cnnlab("viz", "features", run_dir, image, "--layers", "3,9", env=env).stdout  # dense


def test_viz_features_names_the_file_after_the_image_and_each_layer_with_its_kind(run, tmp_path):
    run_dir, image, env = run
    other = tmp_path / "two.png"
    shutil.copy(image, other)
    for picture in (image, other):
        out = cnnlab("viz", "features", run_dir, picture, "--out", tmp_path / "maps", env=env).stdout
        assert "0: (1, 16, 24, 24) Conv2d" in out and "3: (1, 16, 12, 12) Conv2d" in out
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["features-one.png", "features-two.png"]


def test_default_feature_layers_reach_the_last_conv_layer_and_rows_name_the_layer_kind():
    model = create_model("resnet18")
    layers = default_feature_layers(model)
    assert layers == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer4.1.conv2"]  # first three and the last
    small = create_model("cnn", spec="c4,p,c8,f8", in_channels=3, num_classes=2, input_size=[8, 8])
    assert default_feature_layers(small) == ["0", "3"]  # two conv layers: each once
    maps = feature_maps(small, torch.randn(1, 3, 8, 8), ["0", "3", "6"])
    fig = plot_feature_maps(maps, np.zeros((8, 8, 3), dtype=np.uint8), kinds=layer_kinds(small, list(maps)))
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == ["input", "0 (Conv2d)\n(1, 4, 8, 8)", "3 (Conv2d)\n(1, 8, 4, 4)", "6 (Linear)\n(1, 8)"]


def test_a_failed_viz_command_leaves_no_folder_behind(tmp_path):
    from cnnlab.inference.weights import save_weights

    model = create_model("convnet", in_channels=1, input_size=[28, 28])
    save_weights(
        model,
        tmp_path / "model.safetensors",
        {
            "model": "convnet",
            "model_args": {"in_channels": 1, "input_size": [28, 28]},
            "classes": [str(i) for i in range(10)],
            "mean": [0.5],
            "std": [0.5],
            "input_shape": [1, 28, 28],
        },
    )
    assert cnnlab("viz", "gabor", tmp_path / "model.safetensors", check=False).returncode == 2  # 3x3 filters
    assert cnnlab("viz", "conv", "--filters", "9", check=False).returncode == 2
    assert (
        cnnlab(
            "viz", "conv", "--image", tmp_path / "missing.png", "--out", tmp_path / "a" / "b", check=False
        ).returncode
        == 2
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]  # no ./viz, no a/b
    out = cnnlab("viz", "filters", tmp_path / "model.safetensors").stdout  # the default folder, once there is a file
    assert out.endswith("-> viz/filters-0.png\n") and (tmp_path / "viz" / "filters-0.png").is_file()


def test_gabor_refuses_3x3_filters_and_says_what_to_train(tmp_path):
    from cnnlab.inference.weights import save_weights

    model = create_model("convnet", in_channels=1, input_size=[28, 28])
    save_weights(
        model,
        tmp_path / "model.safetensors",
        {
            "model": "convnet",
            "model_args": {"in_channels": 1, "input_size": [28, 28]},
            "classes": [str(i) for i in range(10)],
            "mean": [0.5],
            "std": [0.5],
            "input_shape": [1, 28, 28],
        },
    )
    bad = cnnlab("viz", "gabor", tmp_path / "model.safetensors", check=False)
    assert bad.returncode == 2 and "3x3" in bad.stderr and "5x5" in bad.stderr and "resnet18" in bad.stderr


def test_report_holds_every_section_with_embedded_images_only(run):
    run_dir, _, _ = run
    page = (run_dir / "report.html").read_text()
    for section in (
        "Configuration and environment",
        "Model: cnn",
        "Training curves",
        "Test results",
        "Per-class accuracy",
        "Most confused pairs",
        "Highest-loss test images",
        "First-layer filters",
        "Compared with macaque V1 simple cells",
    ):
        assert section in page, section
    assert page.count("<img ") == page.count('src="data:image/png;base64,') >= 6
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network
    cells = re.findall(r"<td>([^<]*)</td>", page)
    assert "wall_seconds" in cells and "threads" in cells
    # a float is rounded when it shows at most 2 decimals (93.33%) or at most 4 significant digits (0.0001235)
    too_precise = [
        n
        for cell in cells
        for n in re.findall(r"\d+\.\d+", cell)
        if len(n.split(".")[1]) > 2 and len(n.replace(".", "").lstrip("0")) > 4
    ]
    assert not too_precise, too_precise  # e.g. wall_seconds 11.96, not 11.962228814000127


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_in_a_real_headless_browser(run, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run should install Debian's chromium")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    run_dir, _, _ = run
    url = (run_dir / "report.html").resolve().as_uri()
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        flags + ["--enable-logging=stderr", "--v=0", "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = dom.stdout[dom.stdout.index("<body") :].split(">", 1)[0]
    images = body.split('data-images="')[1].split('"')[0]
    decoded, total = map(int, images.split("/"))
    assert total >= 6 and decoded == total, images
    assert 'data-errors="0"' in body
    console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "rror" in line]
    assert not console_errors, console_errors
    shot = tmp_path / "report.png"
    subprocess.run(
        flags + [f"--screenshot={shot}", "--window-size=1200,2400", url], capture_output=True, timeout=120, check=True
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and figures, not a blank page


def test_filters_of_an_alexnet_checkpoint_as_torchvision_saves_it(tmp_path):
    # a plain state dict with torchvision's key names: the very file a user downloads
    torch.save(create_model("alexnet").state_dict(), tmp_path / "alexnet-owt.pth")
    out = cnnlab("viz", "filters", tmp_path / "alexnet-owt.pth", "--model", "alexnet", "--out", tmp_path).stdout
    assert "features.0: 64 filters of 3x11x11" in out and (tmp_path / "filters-features_0.png").is_file()


def test_no_report_skips_the_page(run, tmp_path):
    from conftest import write_image_folder

    root = write_image_folder(tmp_path / "shapes")
    result = cnnlab(
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        root,
        "--model",
        "cnn",
        "--model-arg",
        "spec=c4,p,f8",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--run-dir",
        tmp_path / "run",
        "--progress",
        "none",
        "--no-report",
        env=run[2],
    )
    assert "report:" not in result.stdout and not (tmp_path / "run" / "report.html").exists()
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_the_report_shows_the_runs_own_evaluation_and_rescores_identically_without_it(run):
    from cnnlab.inference.evaluate import inference_runtime
    from cnnlab.inference.test_split import open_test_split
    from cnnlab.inference.weights import load_weights
    from cnnlab.run import Run
    from cnnlab.viz.report import hardest_examples, run_evaluation

    run_dir, _, env = run
    summary = json.loads((run_dir / "summary.json").read_text())
    loaded = load_weights(run_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNNLAB_CACHE", env["CNNLAB_CACHE"])
        split = open_test_split(
            "imagefolder",
            yaml_data_dir(run_dir),
            preprocess=loaded.preprocess,
            runtime=inference_runtime("cpu", summary["precision"]),
            streamed=summary["data_mode"] == "stream",
        )
    own = run_evaluation(Run(run_dir), loaded, split, summary)
    assert own["source"] == "the run's own evaluation" and own["accuracy"] == summary["test_accuracy"]
    again = run_evaluation(Run(run_dir), loaded, split, {"precision": summary["precision"]})  # as if nothing was saved
    assert again["source"].startswith("scored again")
    assert again["confusion"] == own["confusion"] and again["accuracy"] == own["accuracy"]
    assert torch.equal(again["preds"], own["preds"]) and torch.allclose(again["losses"], own["losses"], atol=1e-5)
    top, losses, _ = hardest_examples(own, k=5)
    assert losses.tolist() == sorted(own["losses"].tolist(), reverse=True)[:5]
    assert (
        "the run&#x27;s own evaluation" in (run_dir / "report.html").read_text()
        or "the run's own evaluation" in (run_dir / "report.html").read_text()
    )


def yaml_data_dir(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["data_dir"]
