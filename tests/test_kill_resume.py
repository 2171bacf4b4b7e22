"""SIGKILL at random moments, then `--resume`: the weights end bitwise identical to an uninterrupted run."""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

KILL_POINTS = 3


def train_args(root, run, *extra):
    return [sys.executable, "-m", "cnnlab", "train", "--dataset", "imagefolder", "--data-dir", str(root),
            "--model", "cnn", "--model-arg", "spec=c8x2,p,f32", "--batch-size", "8", "--epochs", "60",
            "--checkpoint-every", "5", "--augment", "crop:2:reflect,flip", "--run-dir", str(run), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import write_image_folder
    tmp = tmp_path_factory.mktemp("kill")
    root = write_image_folder(tmp / "shapes")
    env = {**os.environ, "CNNLAB_CACHE": str(tmp / "cache")}
    subprocess.run(train_args(root, tmp / "reference", "--progress", "none"), env=env, check=True,
                   capture_output=True, timeout=300)
    return root, load_file(tmp / "reference" / "model.safetensors"), env


@pytest.mark.parametrize("seed", range(KILL_POINTS))
def test_sigkill_at_a_random_moment_then_resume_gives_identical_weights(reference, tmp_path, seed):
    root, expected, env = reference
    run = tmp_path / "run"
    rng = random.Random(seed)
    proc = subprocess.Popen(train_args(root, run, "--progress", "plain", "--log-every", "1"), env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # wait until training runs, then kill after a random delay
            if line.startswith("step "):
                break
        # keep draining the pipe, so that the run never blocks on a full stderr buffer
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model.safetensors").exists(), "the kill came after the run had finished"
    resumed = subprocess.run([sys.executable, "-m", "cnnlab", "train", "--resume", str(run), "--progress", "none"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    got = load_file(run / "model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
