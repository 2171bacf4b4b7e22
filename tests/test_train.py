"""Training runs on a small learnable image folder: accuracy, run folder, resume equality, failures."""

import csv
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cnnlab.engine import TrainConfig, fit, resume_config
from cnnlab.errors import CheckpointError, ConfigError
from cnnlab.training.checkpoint import CheckpointManager, read_checkpoint
from cnnlab.training.trainer import TrainingError, TrainingInterrupted


def quick(image_folder, run_dir, **kw) -> TrainConfig:
    base = dict(
        dataset="imagefolder",
        data_dir=str(image_folder),
        run_dir=str(run_dir),
        epochs=3,
        batch_size=16,
        optimizer="adamw",
        lr=3e-3,
        progress="none",
        model="cnn",
        model_args={"spec": "c8x2,p,f32"},
        augment="none",
    )
    base.update(kw)
    return TrainConfig(**base)


def silent(message):
    pass


def test_short_run_learns_and_writes_the_run_folder(image_folder, tmp_path):
    summary = fit(quick(image_folder, tmp_path / "run"), log=silent)
    run = tmp_path / "run"
    assert summary["test_accuracy"] >= 0.9  # three well-separated classes; chance is 1/3
    assert {"config.yaml", "metrics.csv", "last.ckpt", "model.safetensors", "model.json", "summary.json"} <= {
        p.name for p in run.iterdir()
    }
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "img_per_s"]
    meta = json.loads((run / "model.json").read_text())
    assert meta["classes"] == ["circle", "square", "stripe"] and meta["input_shape"] == [3, 16, 16]
    assert len(meta["mean"]) == 3 and all(0 < s < 1 for s in meta["std"])
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 3
    info = json.loads((run / "summary.json").read_text())
    assert info["versions"]["torch"] == torch.__version__ and info["dataset"]["name"] == "imagefolder"


def _stop_at(step):
    def callback(state):
        if state.step == step:
            state.stop_requested = True

    return callback


@pytest.mark.parametrize(
    "stop_step, augment, checkpoint_every",
    [
        (5, "crop:2:reflect,flip,cutout:4", 0),  # mid-epoch (7 steps per epoch)
        (14, "translate:2", 0),  # exactly at an epoch boundary
        (10, "flip", 4),  # after a periodic checkpoint
    ],
)
def test_resumed_run_is_bitwise_identical_to_an_uninterrupted_one(
    image_folder, tmp_path, stop_step, augment, checkpoint_every
):
    kw = dict(augment=augment, checkpoint_every=checkpoint_every, val_split=0.1)
    fit(quick(image_folder, tmp_path / "a", **kw), log=silent)
    with pytest.raises(TrainingInterrupted) as info:
        fit(quick(image_folder, tmp_path / "b", **kw), callbacks=[_stop_at(stop_step)], log=silent)
    assert info.value.exit_code == 130 and "cnnlab train --resume" in str(info.value)
    fit(resume_config(tmp_path / "b"), resume=True, log=silent)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "metrics.csv").read_text().count("\n") == (
        tmp_path / "b" / "metrics.csv"
    ).read_text().count("\n")


def test_resume_with_another_architecture_is_refused(image_folder, tmp_path):
    fit(quick(image_folder, tmp_path / "run", epochs=1), log=silent)
    other = TrainConfig(model="convnet")
    with pytest.raises(CheckpointError, match="cannot resume .* with model = 'convnet'.*made with 'cnn'"):
        resume_config(tmp_path / "run", other, changed=["model"])


def test_resume_can_extend_a_schedule_that_does_not_depend_on_the_run_length(image_folder, tmp_path):
    fit(quick(image_folder, tmp_path / "run", epochs=1, schedule="constant"), log=silent)
    cfg = resume_config(tmp_path / "run", TrainConfig(epochs=2), changed=["epochs"])
    assert fit(cfg, resume=True, log=silent)["epochs"] == 2


def test_resume_refuses_to_redraw_a_finished_one_cycle_schedule_and_gives_the_choices(image_folder, tmp_path):
    fit(quick(image_folder, tmp_path / "run", epochs=1), log=silent)
    cfg = resume_config(tmp_path / "run", TrainConfig(epochs=2), changed=["epochs"])
    with pytest.raises(
        ConfigError,
        match=r"onecycle schedule was laid out over 7 steps.*step 2: .* then, .* now\)"
        r".*--epochs 1.*--init-from",
    ):
        fit(cfg, resume=True, log=silent)


def test_resume_of_a_finished_run_says_it_is_finished(image_folder, tmp_path):
    first = fit(quick(image_folder, tmp_path / "run", epochs=1), log=silent)
    messages = []
    again = fit(resume_config(tmp_path / "run"), resume=True, log=messages.append)
    assert (again["test_accuracy"], again["steps"]) == (first["test_accuracy"], first["steps"])
    assert "is finished (1 epochs" in messages[-1] and "--init-from" in messages[-1]


def test_init_from_starts_a_new_run_from_trained_weights(image_folder, tmp_path):
    fit(quick(image_folder, tmp_path / "a", epochs=1), log=silent)
    # one step at a vanishing learning rate: run b's weights are run a's
    fit(quick(image_folder, tmp_path / "b", epochs=1, max_steps=1, lr=1e-12, init_from=str(tmp_path / "a")), log=silent)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-8) for k in a)
    with pytest.raises(ConfigError, match="--init-from .* holds a 'cnn'.*not 'convnet'"):
        fit(
            quick(
                image_folder, tmp_path / "c", epochs=1, model="convnet", model_args={}, init_from=str(tmp_path / "a")
            ),
            log=silent,
        )


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(image_folder, tmp_path):
    run = tmp_path / "run"
    fit(quick(image_folder, run, epochs=1, schedule="constant"), log=silent)
    good = read_checkpoint(run / "last.ckpt")

    def poison(state):  # corrupt the weights after step 9, so step 10's loss is NaN
        if state.step == 9:
            next(state.model.parameters()).data.fill_(float("nan"))

    cfg = resume_config(run, TrainConfig(epochs=2), changed=["epochs"])
    with pytest.raises(TrainingError, match=r"step 10 \(epoch 2\): the loss is nan"):
        fit(cfg, resume=True, callbacks=[poison], log=silent)
    assert read_checkpoint(run / "last.ckpt")["step"] == good["step"] == 7


def test_corrupt_last_checkpoint_falls_back_to_the_previous(image_folder, tmp_path):
    run = tmp_path / "run"
    fit(quick(image_folder, run, epochs=2), log=silent)
    last = run / "last.ckpt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    messages = []
    state = CheckpointManager(run).load_latest(log=messages.append)
    assert state["step"] == 7 and "checksum mismatch" in messages[0]
    assert (run / "last.ckpt.damaged").exists()


def test_checkpoint_refuses_code_execution(tmp_path):
    import hashlib
    import io

    from conftest import CodeRunningPickle

    from cnnlab.training.checkpoint import MAGIC

    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"x": CodeRunningPickle(marker)}, buffer, pickle_protocol=2)
    payload = buffer.getvalue()
    (tmp_path / "last.ckpt").write_bytes(MAGIC + hashlib.sha256(payload).digest() + payload)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_checkpoint(tmp_path / "last.ckpt")
    assert not marker.exists()


def test_config_errors_come_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="lr = -0.1 is invalid"):
        fit(TrainConfig(lr=-0.1, run_dir=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def test_an_existing_run_folder_is_not_overwritten(image_folder, tmp_path):
    fit(quick(image_folder, tmp_path / "run", epochs=1), log=silent)
    with pytest.raises(ConfigError, match="already holds a run; resume it"):
        fit(quick(image_folder, tmp_path / "run", epochs=1), log=silent)


@pytest.mark.integration
def test_fashion_mnist_subset_is_clearly_above_chance(fashion_mnist_dir, tmp_path):
    cfg = TrainConfig(
        data_dir=str(fashion_mnist_dir), train_subset=6000, epochs=2, run_dir=str(tmp_path / "run"), progress="none"
    )
    summary = fit(cfg, log=silent)
    assert summary["test_accuracy"] > 0.70  # chance is 0.10
    assert summary["dataset"]["verified"]


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_over(image_folder, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        fit(quick(image_folder, run, epochs=1), callbacks=[_stop_at(2)], log=silent)
    (run / "last.ckpt").unlink()  # as if killed before any checkpoint was written
    messages = []
    summary = fit(resume_config(run), resume=True, log=messages.append)
    assert any("no checkpoint yet; starting it from the beginning" in m for m in messages) and summary["steps"] == 7


def test_weights_that_turn_non_finite_are_never_saved(image_folder, tmp_path):
    run = tmp_path / "run"
    fit(quick(image_folder, run, epochs=1, schedule="constant"), log=silent)

    def poison_after_last_step(state):  # the loss of step 14 was finite; the weights after it are not
        if state.step == 14:
            next(state.model.parameters()).data.fill_(float("inf"))

    with pytest.raises(TrainingError, match="step 14: the weights hold NaN or infinite values"):
        fit(
            resume_config(run, TrainConfig(epochs=2), changed=["epochs"]),
            resume=True,
            callbacks=[poison_after_last_step],
            log=silent,
        )
    assert read_checkpoint(run / "last.ckpt")["step"] == 7


def test_resume_on_other_data_is_refused(image_folder, tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    fit(quick(image_folder, run, epochs=1), log=silent)
    first = sorted((image_folder / "train" / "circle").iterdir())[0]
    Image.new("RGB", (16, 16), "white").save(first)
    with pytest.raises(CheckpointError, match="is not the one the run was trained on"):
        fit(resume_config(run, TrainConfig(epochs=2), changed=["epochs"]), resume=True, log=silent)
