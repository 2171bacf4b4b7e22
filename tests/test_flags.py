"""Every training flag, checked by what a user would notice when it stops working: the gradient norm that
--grad-clip caps, the step count and schedule of --max-steps, the test columns of --eval-every, the dtype
that --precision computes in, the threads of --threads, the device of --device, and torch.compile.

Tiny runs on the learnable image folder of conftest (120 training images, batches of 16: 7 steps an epoch).
"""
import csv
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cnnlab.cli import main
from cnnlab.engine import TrainConfig, fit, resume_config
from cnnlab.engine import runtime as rt
from cnnlab.engine.checkpoint import read_checkpoint
from cnnlab.engine.optim import build_schedule
from cnnlab.engine.recipes import apply_recipe
from cnnlab.engine.trainer import TrainingInterrupted
from cnnlab.errors import ConfigError

STEPS_PER_EPOCH = 7  # 120 images // 16


def quick(image_folder, run_dir, **kw) -> TrainConfig:
    # precision and memory format fixed, so that no test but the one about `auto` pays for the CPU probe
    base = dict(dataset="imagefolder", data_dir=str(image_folder), run_dir=str(run_dir), epochs=1, batch_size=16,
                optimizer="adamw", lr=3e-3, progress="none", model="cnn", model_args={"spec": "c8,p,f16"},
                augment="none", precision="fp32", channels_last="off")
    base.update(kw)
    return TrainConfig(**base)


def silent(message):
    pass


def rows(run) -> list[dict]:
    return list(csv.DictReader((run / "metrics.csv").open()))


def summary_of(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def same_weights(a, b) -> bool:
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli(capsys, *args):
    """`cnnlab ARGS` in this process (a subprocess costs seconds of imports on a loaded machine): the exit
    code, stdout and stderr."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------- --max-steps

def _learning_rates(into: list):
    def callback(state):
        into.append(state.lr)
    return callback


@pytest.mark.parametrize("max_steps, epochs_column", [(10, ["1", "1.4286"]), (14, ["1", "2"])])
def test_max_steps_stops_after_exactly_that_many_steps_and_spans_the_schedule(image_folder, tmp_path, max_steps,
                                                                              epochs_column):
    run, lrs = tmp_path / "run", []
    summary = fit(quick(image_folder, run, epochs=3, max_steps=max_steps), callbacks=[_learning_rates(lrs)],
                  log=silent)
    assert summary["steps"] == max_steps == len(lrs)
    assert summary["epochs"] == round(max_steps / STEPS_PER_EPOCH, 4) and summary["train_seconds"] > 0
    table = rows(run)
    assert [r["epoch"] for r in table] == epochs_column  # a run cut mid-epoch has a row for the part it ran
    assert all(r["test_acc"] != "" and float(r["seconds"]) > 0 for r in table)
    # the one-cycle schedule is laid out over the steps run: it ends near 0 at step max_steps - 1
    lr_at = build_schedule("onecycle", 3e-3, max_steps, steps_per_epoch=STEPS_PER_EPOCH)
    assert lrs == [lr_at(s) for s in range(max_steps)]
    assert float(table[-1]["lr"]) == pytest.approx(lr_at(max_steps - 1), rel=1e-12)
    assert lr_at(max_steps - 1) < 3e-3 / 7  # not the middle of a 21-step schedule
    assert (run / "model.safetensors").is_file() and read_checkpoint(run / "last.ckpt")["step"] == max_steps


def test_a_run_interrupted_before_max_steps_resumes_to_the_same_weights(image_folder, tmp_path):
    kw = dict(epochs=3, max_steps=10, augment="flip")
    fit(quick(image_folder, tmp_path / "a", **kw), log=silent)

    def stop_at_9(state):
        state.stop_requested = state.step == 9
    with pytest.raises(TrainingInterrupted):
        fit(quick(image_folder, tmp_path / "b", **kw), callbacks=[stop_at_9], log=silent)
    assert fit(resume_config(tmp_path / "b"), resume=True, log=silent)["steps"] == 10
    assert same_weights(tmp_path / "a", tmp_path / "b")
    assert [r["epoch"] for r in rows(tmp_path / "b")] == ["1", "1.4286"]


@pytest.mark.parametrize("epochs, max_steps, drops", [
    (2, 64_000, (7, 10)),  # 14 steps run: 0.5 and 0.75 of them (10.5 rounds to even)
    (3, 12, (6, 9)),       # capped like the paper's 64k iterations: fractions of the 12 steps run, not of 21
])
def test_he2016_recipe_divides_the_learning_rate_at_half_and_three_quarters_of_the_steps_run(
        image_folder, tmp_path, epochs, max_steps, drops):
    cfg = apply_recipe(quick(image_folder, tmp_path / "run"), "he2016")
    assert (cfg.max_steps, cfg.milestones, cfg.milestone_unit) == (64_000, [0.5, 0.75], "fraction")
    cfg.epochs, cfg.max_steps, cfg.batch_size = epochs, max_steps, 16  # the paper's 128 is more than 120 images
    lrs = []
    summary = fit(cfg, callbacks=[_learning_rates(lrs)], log=silent)
    steps = min(epochs * STEPS_PER_EPOCH, max_steps)
    assert summary["steps"] == steps
    expected = [0.1] * drops[0] + [0.01] * (drops[1] - drops[0]) + [0.001] * (steps - drops[1])
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_he2016_recipe_on_the_command_line_takes_the_flags_over_the_recipe(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--recipe", "he2016", "--dataset", "imagefolder", "--data-dir", image_folder,
                         "--model", "cnn", "--model-arg", "spec=c8,p,f16", "--batch-size", 16, "--epochs", 3,
                         "--max-steps", 12, "--precision", "fp32", "--channels-last", "off", "--progress", "none",
                         "--no-report", "--run-dir", run)
    assert code == 0, err
    assert "12 steps (1.71 epochs)" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["lr"], saved["weight_decay"], saved["max_steps"], saved["epochs"]) == (0.1, 1e-4, 12, 3)
    # epoch 1 ends with step index 6, the first milestone (0.5 x 12); the partial epoch 2 at index 11
    assert [(r["epoch"], float(r["lr"])) for r in rows(run)] == [("1", pytest.approx(0.01)),
                                                                  ("1.7143", pytest.approx(0.001))]
    assert summary_of(run)["steps"] == 12


# ---------------------------------------------------------------------------------------------- --device

def test_device_cpu_trains_on_the_cpu_and_is_recorded(image_folder, tmp_path):
    devices = []
    summary = fit(quick(image_folder, tmp_path / "run", device="cpu"),
                  callbacks=[lambda state: devices.append(next(state.model.parameters()).device.type)], log=silent)
    assert devices == ["cpu"] * STEPS_PER_EPOCH
    assert summary["device"] == rt.device_name(torch.device("cpu"))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["device"] == "cpu"


@pytest.mark.parametrize("device, message", [
    pytest.param("cuda", "device 'cuda' asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param("cuda:7", "device 'cuda:7' asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param("mps", "device 'mps' asked for, but PyTorch sees no Apple GPU (MPS); use --device cpu or auto",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
    ("cudax", "device 'cudax' is not a device name; use auto, cpu, cuda or cuda:N"),
])
def test_a_device_this_machine_lacks_is_refused_before_any_work(tmp_path, capsys, device, message):
    run = tmp_path / "run"
    # a dataset folder that does not exist: the device must be refused first
    code, out, err = cli(capsys, "train", "--device", device, "--dataset", "imagefolder", "--data-dir",
                         tmp_path / "missing", "--model", "cnn", "--model-arg", "spec=c8,p,f16", "--progress", "none",
                         "--no-report", "--run-dir", run)
    assert code == 2 and err.strip() == f"error: {message}" and out == ""
    assert not run.exists()


def test_a_cuda_index_beyond_the_machine_s_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rt.pick_device("cuda:1") == torch.device("cuda", 1)
    assert rt.pick_device("cuda", local_rank=3) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"device 'cuda:2' asked for, but this machine has 2 CUDA GPU\(s\), "
                                          r"cuda:0 to cuda:1; use --device cuda or one of those"):
        rt.pick_device("cuda:2")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_cuda_trains_on_the_gpu(image_folder, tmp_path):
    devices = []
    summary = fit(quick(image_folder, tmp_path / "run", device="cuda", epochs=3, model_args={"spec": "c8x2,p,f32"}),
                  callbacks=[lambda state: devices.append(next(state.model.parameters()).device.type)], log=silent)
    assert set(devices) == {"cuda"} and summary["device"] == torch.cuda.get_device_name()
    assert summary["test_accuracy"] >= 0.9
