"""Training and evaluation on streamed data through `cnnlab.fit` and the CLI: image folders of mixed sizes and
modes, bad images counted and bounded, resume bitwise in stream mode, packed shards, and two ranks on shards."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_image_folder
from mixed_images import write_mixed_folder
from safetensors.torch import load_file

from cnnlab.engine import TrainConfig, fit, resume_config
from cnnlab.errors import DatasetError
from cnnlab.training.trainer import TrainingInterrupted


def silent(message):
    pass


def streamed(root, run, **kw) -> TrainConfig:
    base = dict(
        dataset="imagefolder",
        data_dir=str(root),
        run_dir=str(run),
        epochs=2,
        batch_size=8,
        image_size=24,
        model="cnn",
        model_args={"spec": "c8,p,c8,p,f16"},
        optimizer="adamw",
        lr=3e-3,
        progress="none",
        report=False,
        workers=2,
        data_mode="stream",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_mixed_sizes_and_modes_stream_and_the_bad_images_are_counted_and_named(tmp_path):
    files = write_mixed_folder(tmp_path / "mixed")
    summary = fit(streamed(tmp_path / "mixed", tmp_path / "run", data_mode="auto", max_bad_images=5), log=silent)
    assert summary["data_mode"] == "stream" and "corrupt.jpg has no readable header" in summary["data_mode_reason"]
    bad = {item["file"] for item in summary["bad_images"]["files"]}
    assert summary["bad_images"]["count"] == 2 and bad == {str(files["corrupt"]), str(files["truncated"])}
    assert 0 <= summary["test_accuracy"] <= 1 and summary["steps"] == 2 * (18 // 8)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["input_shape"] == [3, 24, 24]


def test_more_bad_images_than_allowed_stop_the_run_with_the_names_and_the_fix(tmp_path):
    write_mixed_folder(tmp_path / "mixed")
    with pytest.raises(DatasetError, match=r"unreadable images, more than the 1 allowed.*--max-bad-images"):
        fit(streamed(tmp_path / "mixed", tmp_path / "run", max_bad_images=1), log=silent)


def test_a_streamed_run_resumes_bit_for_bit(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class=(16, 4), size=28)
    fit(streamed(root, tmp_path / "a", checkpoint_every=3), log=silent)

    def stop_at_4(state):
        state.stop_requested = state.step == 4

    with pytest.raises(TrainingInterrupted):
        fit(streamed(root, tmp_path / "b", checkpoint_every=3), callbacks=[stop_at_4], log=silent)
    fit(resume_config(tmp_path / "b"), resume=True, log=silent)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def cnnlab(*args, env):
    result = subprocess.run(
        [sys.executable, "-m", "cnnlab", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_training_from_packed_shards_and_evaluating_the_run(tmp_path):
    env = {"CNNLAB_CACHE": str(tmp_path / "cache")}
    root = write_image_folder(tmp_path / "f", per_class=(40, 10), size=24)
    cnnlab("data", "pack", root, tmp_path / "shards", "--shard-size", "20KB", env=env)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) > 2
    run = tmp_path / "run"
    cnnlab(
        "train",
        "--dataset",
        "shards",
        "--data-dir",
        tmp_path / "shards",
        "--model",
        "cnn",
        "--model-arg",
        "spec=c8,p,f16",
        "--image-size",
        "24",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--optimizer",
        "adamw",
        "--lr",
        "0.003",
        "--run-dir",
        run,
        "--progress",
        "none",
        "--no-report",
        "--workers",
        "2",
        env=env,
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data_mode"] == "stream" and summary["test_accuracy"] >= 0.8  # 3 separable classes
    evaluated = cnnlab("eval", run, "--json", env=env)
    assert json.loads(evaluated.stdout.splitlines()[-1])["accuracy"] == summary["test_accuracy"]


def test_resnet18_takes_a_few_steps_on_two_ranks_from_shards(tmp_path):
    env = {"CNNLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    root = write_image_folder(tmp_path / "f", per_class=(24, 6), size=32)
    cnnlab("data", "pack", root, tmp_path / "shards", "--shard-size", "10KB", env=env)
    run = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "cnnlab",
            "train",
            "--dataset",
            "shards",
            "--data-dir",
            str(tmp_path / "shards"),
            "--model",
            "resnet18",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--max-steps",
            "3",
            "--run-dir",
            str(run),
            "--progress",
            "none",
            "--no-report",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 2 and summary["data_mode"] == "stream"
