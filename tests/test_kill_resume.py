"""SIGKILL at random moments (inside a step, while a checkpoint is written, during evaluation), then
`cnnlab train --resume`: the weights end bitwise identical to an uninterrupted run with the same seed.

The run prints phase changes with CNNLAB_TRACE=1, so each kill can be aimed at a phase and then
checked to have landed there (a partial checkpoint file left behind; an epoch's metrics row missing).
A step is too short to hit by timing on a loaded machine: there the run stops itself inside the chosen
step, in its loss or its backward pass (tests/faults.py stall-step), and is killed while it waits; the
step before it has printed its progress line, that step has not, and the last checkpoint is older.
"""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnnlab.training.checkpoint import read_checkpoint

EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 12, 15, 5
PHASES = ("step", "checkpoint", "evaluate")
# Three kills in the default suite (one per phase), twelve more in the slow suite: 15 in all.
DEFAULT_POINTS = [(phase, 0) for phase in PHASES]
SLOW_POINTS = [(phase, seed) for seed in range(1, 5) for phase in PHASES]
FAULTS = str(Path(__file__).with_name("faults.py"))


def train_args(root, run, *extra):
    # 120 training images in batches of 8: 15 steps an epoch. A wide dense layer makes the checkpoint
    # about 8 MB, so that its write lasts long enough to be hit; 900 test images do the same for evaluation.
    return [
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
        "spec=c16x2,p,f1024",
        "--batch-size",
        "8",
        "--epochs",
        str(EPOCHS),
        "--checkpoint-every",
        str(CHECKPOINT_EVERY),
        "--augment",
        "crop:2:reflect,flip",
        "--run-dir",
        str(run),
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import write_image_folder

    tmp = tmp_path_factory.mktemp("kill")
    root = write_image_folder(tmp / "shapes", per_class=(40, 300))
    env = {**os.environ, "CNNLAB_CACHE": str(tmp / "cache"), "CNNLAB_TRACE": "1"}
    subprocess.run(
        train_args(root, tmp / "reference", "--progress", "none"), env=env, check=True, capture_output=True, timeout=600
    )
    return root, load_file(tmp / "reference" / "model.safetensors"), env


def _kill_at(proc, marker: str, target: int) -> tuple[str, list[str]]:
    """Read the run's stderr until the `target`-th line starting with `marker` and SIGKILL the run there;
    return that line and every line the run printed, up to its death."""
    seen, printed = 0, []
    for line in proc.stderr:
        printed.append(line)
        if line.startswith(marker):
            seen += 1
            if seen == target:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                return line.strip(), printed + proc.stderr.read().splitlines(keepends=True)
    raise AssertionError(f"the run ended before {marker!r} number {target}")


def _kill_and_resume(reference, tmp_path, phase: str, seed: int):
    root, expected, env = reference
    run = tmp_path / "run"
    rng = random.Random(f"{phase}-{seed}")
    total = {
        "step": EPOCHS * STEPS_PER_EPOCH,
        "evaluate": EPOCHS,
        "checkpoint": EPOCHS * -(-STEPS_PER_EPOCH // CHECKPOINT_EVERY),
    }[phase]
    target = rng.randrange(1, total - 1)  # never the last one: the kill must land before the run ends
    command = train_args(root, run, "--progress", "plain", "--log-every", "1")
    marker, occurrence = {"checkpoint": "trace: checkpoint-write", "evaluate": "trace: evaluate"}.get(phase), target
    if phase == "step":  # the run itself stops inside step `target` and waits to be killed
        part = rng.choice(("loss", "backward"))
        command = [sys.executable, FAULTS, *command[3:]]
        env = {**env, "CNNLAB_FAULT": f"stall-step:{target}:{part}"}
        marker, occurrence = f"fault: stalled in step {target} ({part})", 1
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        trigger, printed = _kill_at(proc, marker, occurrence)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model.safetensors").exists(), "the kill came after the run had finished"
    if phase == "step":  # inside the step: the one before it finished and was checkpointed as usual, it did not
        progress = [line for line in printed if line.startswith("step ")]
        assert progress[-1].startswith(f"step {target - 1}/") if target > 1 else not progress, progress[-1:]
        assert not any(line.startswith(f"step {target}/") for line in printed), f"step {target} had finished"
        checkpointed = CHECKPOINT_EVERY * ((target - 1) // CHECKPOINT_EVERY)  # the last checkpoint before it
        assert (read_checkpoint(run / "last.ckpt")["step"] if (run / "last.ckpt").exists() else 0) == checkpointed
    if phase == "checkpoint":  # the kill landed mid-write: the partial file is there, `last.ckpt` untouched
        partial = trigger.split(" ", 2)[2]
        assert os.path.exists(partial), f"the checkpoint write had already finished: {trigger}"
    if phase == "evaluate":  # the kill landed before that epoch's evaluation was done and logged
        epoch = int(trigger.rsplit(" ", 1)[1])
        rows = (run / "metrics.csv").read_text().splitlines()[1:] if (run / "metrics.csv").exists() else []
        assert len(rows) == epoch - 1, f"the evaluation of epoch {epoch} had already finished"

    resumed = subprocess.run(
        [sys.executable, "-m", "cnnlab", "train", "--resume", str(run), "--progress", "none"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    got = load_file(run / "model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert not list(run.glob(".*.tmp")), "partial files from the killed run were left behind"
    assert len((run / "metrics.csv").read_text().splitlines()) == EPOCHS + 1


@pytest.mark.parametrize("phase, seed", DEFAULT_POINTS)
def test_sigkill_then_resume_gives_identical_weights(reference, tmp_path, phase, seed):
    _kill_and_resume(reference, tmp_path, phase, seed)


@pytest.mark.slow
@pytest.mark.parametrize("phase, seed", SLOW_POINTS)
def test_sigkill_at_more_moments_then_resume_gives_identical_weights(reference, tmp_path, phase, seed):
    _kill_and_resume(reference, tmp_path, phase, seed)
