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
from cnnlab.engine import TrainConfig, fit
from cnnlab.engine import runtime as rt
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
