"""The command line end to end, in subprocesses, as a user runs it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def cnnlab(*args, check=True, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    result = subprocess.run(
        [sys.executable, "-m", "cnnlab", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"cnnlab {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short real training run through the CLI, shared by the tests below."""
    from conftest import write_image_folder

    tmp = tmp_path_factory.mktemp("cli")
    root = write_image_folder(tmp / "shapes")
    run = tmp / "run"
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
        "spec=c8x2,p,f32",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--run-dir",
        run,
        "--progress",
        "plain",
        "--log-every",
        "5",
        env_extra=env,
    )
    return run, root, result, env


def test_train_prints_accuracy_and_run_folder(trained_run):
    run, _, result, _ = trained_run
    assert "test accuracy:" in result.stdout and f"run folder: {run}" in result.stdout
    assert "epoch 3/3" in result.stderr and "step 5/" in result.stderr  # plain progress lines


def test_eval_json(trained_run):
    run, root, _, env = trained_run
    out = json.loads(cnnlab("eval", run, "--data-dir", root, "--json", env_extra=env).stdout)
    assert out["n"] == 30 and out["accuracy"] >= 0.9 and set(out["per_class"]) == {"circle", "square", "stripe"}
    assert "top5" not in out and (run / "confusion.png").stat().st_size > 1000 and (run / "eval.json").exists()


def test_predict_reports_bad_files_and_converts_others(trained_run, tmp_path):
    run, root, _, env = trained_run
    Image.fromarray(np.full((40, 30), 200, dtype=np.uint8)).save(tmp_path / "gray-big.png")
    (tmp_path / "notes.png").write_text("not an image")
    Image.fromarray(np.zeros((1, 1, 3), dtype=np.uint8)).save(tmp_path / "tiny.png")
    good = next((root / "test" / "stripe").iterdir())
    result = cnnlab("predict", run, good, tmp_path, "--top-k", "2", "--json", env_extra=env)
    out = json.loads(result.stdout)
    by_file = {r["file"]: r for r in out["results"]}
    assert by_file[str(good)]["top"][0]["class"] == "stripe" and len(by_file[str(good)]["top"]) == 2
    assert set(by_file[str(tmp_path / "gray-big.png")]["notes"]) == {"converted L to RGB", "resized 30x40 to 16x16"}
    skipped = {s["file"]: s["error"] for s in out["skipped"]}
    assert "not a readable image" in skipped[str(tmp_path / "notes.png")]
    assert "1x1 pixels is too small" in skipped[str(tmp_path / "tiny.png")]


def test_predict_with_only_bad_input_fails(trained_run, tmp_path):
    run, _, _, env = trained_run
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8garbage")
    result = cnnlab("predict", run, tmp_path / "x.jpg", check=False, env_extra=env)
    assert result.returncode == 1 and "x.jpg: not a readable image" in result.stderr


def test_resume_with_another_model_is_refused(trained_run):
    run, _, _, env = trained_run
    result = cnnlab("train", "--resume", run, "--model", "convnet", check=False, env_extra=env)
    assert result.returncode == 2 and "cannot resume" in result.stderr and "model = 'convnet'" in result.stderr


def test_summary_json_and_table():
    out = json.loads(cnnlab("summary", "convnet", "--json").stdout)
    assert out["params"] == 264_884 and out["macs"] == 871_680 and len(out["layers"]) == 13
    table = cnnlab("summary", "convnet", "--input-size", "1,28,28").stdout
    assert "Total params: 203,354" in table and "1 MAC = 2 FLOPs" in table


def test_models_lists_the_registry():
    rows = {r["name"]: r for r in json.loads(cnnlab("models", "--json").stdout)}
    assert rows["convnet"]["params"] == 264_884 and rows["convnet"]["input_size"] == [3, 32, 32]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["train", "--model", "nope"],
            "unknown model 'nope'; valid models: airbench94, alexnet, cifar_plain, cifar_resnet, cnn, convnet",
        ),
        (["train", "--lr", "-0.1"], "lr = -0.1 is invalid"),
        (["train", "--batch-size", "0"], "batch_size = 0 is invalid"),
        (["train", "--precision", "fp8"], "precision = 'fp8' is invalid; choices: auto, fp32, bf16"),
        (["train", "--epochs", "two"], "epochs: expected float, got str 'two'"),
        (["summary", "convnet", "--model-arg", "spec=c5"], "takes no argument(s) spec"),
    ],
)
def test_bad_input_is_refused_before_any_work(args, message, tmp_path):
    result = (
        cnnlab(*args, "--run-dir", tmp_path / "r", check=False) if args[0] == "train" else cnnlab(*args, check=False)
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "r").exists()


def test_config_file_then_flags(tmp_path, trained_run):
    _, root, _, env = trained_run
    (tmp_path / "c.yaml").write_text(f"dataset: imagefolder\ndata_dir: {root}\nepochs: 1\nbatch_sise: 3\n")
    result = cnnlab("train", "--config", tmp_path / "c.yaml", check=False, env_extra=env)
    assert result.returncode == 2 and "unknown key(s) 'batch_sise' (did you mean 'batch_size'?)" in result.stderr
    (tmp_path / "c.yaml").write_text(
        f"dataset: imagefolder\ndata_dir: {root}\nepochs: 5\nlr: 1e-3\nbatch_size: 16\n"
        "model: cnn\nmodel_args: {spec: 'c4,p,f8'}\n"
    )
    run = tmp_path / "run"
    cnnlab(
        "train", "--config", tmp_path / "c.yaml", "--epochs", "1", "--run-dir", run, "--progress", "none", env_extra=env
    )
    import yaml

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["epochs"] == 1 and resolved["lr"] == 1e-3 and resolved["model_args"] == {"spec": "c4,p,f8"}


def test_missing_dataset_message(tmp_path):
    result = cnnlab(
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        tmp_path,
        check=False,
        env_extra={"CNNLAB_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 2 and "dataset 'mnist' not found; looked in:" in result.stderr
    assert "cnnlab data fetch mnist" in result.stderr


def test_data_list_and_info(trained_run, tmp_path):
    _, root, _, env = trained_run
    assert "fashion-mnist" in cnnlab("data", "list", env_extra=env).stdout
    out = cnnlab("data", "info", "imagefolder", "--data-dir", root, "--out", tmp_path / "m.png", env_extra=env).stdout
    assert "circle" in out and "train mean" in out and (tmp_path / "m.png").stat().st_size > 1000


def test_version_and_help():
    assert cnnlab("--version").stdout.startswith("cnnlab ")
    assert "--batch-size" in cnnlab("train", "--help").stdout


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint_and_a_hint(trained_run, tmp_path, sig, code):
    import signal

    _, root, _, env = trained_run
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cnnlab",
            "train",
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(root),
            "--model",
            "cnn",
            "--model-arg",
            "spec=c8,p,f16",
            "--batch-size",
            "16",
            "--epochs",
            "5000",
            "--schedule",
            "constant",
            "--run-dir",
            str(run),
            "--progress",
            "plain",
            "--log-every",
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    try:
        for line in proc.stderr:
            if line.startswith("step 3/"):
                break
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code
    assert f"cnnlab train --resume {run}" in err
    # a constant learning rate does not depend on the run's length, so the run may be shortened on resume
    result = cnnlab("train", "--resume", run, "--epochs", "2", "--progress", "none", env_extra=env)
    assert "test accuracy:" in result.stdout


def test_recipe_then_flags(tmp_path, trained_run):
    _, root, _, env = trained_run
    run = tmp_path / "run"
    cnnlab(
        "train",
        "--recipe",
        "he2016",
        "--model",
        "resnet20",
        "--dataset",
        "imagefolder",
        "--data-dir",
        root,
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--run-dir",
        run,
        "--progress",
        "none",
        env_extra=env,
    )
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["lr"] == 0.1 and cfg["weight_decay"] == 1e-4 and cfg["batch_size"] == 32 and cfg["epochs"] == 1
    assert cfg["milestone_unit"] == "fraction"


def test_predict_with_a_torchvision_style_checkpoint_uses_imagenet_preprocessing(tmp_path):
    import torch

    from cnnlab.models import create_model

    torch.manual_seed(0)
    torch.save(create_model("resnet18", num_classes=3).state_dict(), tmp_path / "r18.pth")
    (tmp_path / "classes.txt").write_text("cat\ndog\nfish\n")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = json.loads(
        cnnlab(
            "predict",
            tmp_path / "r18.pth",
            tmp_path / "a.png",
            "--model",
            "resnet18",
            "--classes",
            tmp_path / "classes.txt",
            "--json",
        ).stdout
    )
    top = out["results"][0]["top"]
    assert {t["class"] for t in top} == {"cat", "dog", "fish"} and abs(sum(t["probability"] for t in top) - 1) < 1e-5
    result = cnnlab("predict", tmp_path / "r18.pth", tmp_path / "a.png", check=False)
    assert result.returncode == 2 and "takes --model NAME for such files" in result.stderr


def test_predict_model_flag_must_agree_with_the_sidecar(trained_run):
    run, root, _, env = trained_run
    image = next((root / "test" / "circle").iterdir())
    result = cnnlab("predict", run, image, "--model", "resnet20", check=False, env_extra=env)
    assert result.returncode == 2 and "its sidecar says it is 'cnn', not 'resnet20'" in result.stderr
