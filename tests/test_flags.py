"""Every training flag, checked by what a user would notice when it stops working: the gradient norm that
--grad-clip caps, the step count and schedule of --max-steps, the test columns of --eval-every, the dtype
that --precision computes in, the threads of --threads, the device of --device, and torch.compile.

Tiny runs on the learnable image folder of conftest (120 training images, batches of 16: 7 steps an epoch).
"""

import csv
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cnnlab.cli import main
from cnnlab.engine import TrainConfig, fit, resume_config
from cnnlab.engine import runtime as rt
from cnnlab.errors import ConfigError
from cnnlab.training.checkpoint import read_checkpoint
from cnnlab.training.optim import build_schedule
from cnnlab.training.recipes import apply_recipe
from cnnlab.training.trainer import TrainingError, TrainingInterrupted

STEPS_PER_EPOCH = 7  # 120 images // 16


def quick(image_folder, run_dir, **kw) -> TrainConfig:
    # precision and memory format fixed, so that no test but the one about `auto` pays for the CPU probe
    base = dict(
        dataset="imagefolder",
        data_dir=str(image_folder),
        run_dir=str(run_dir),
        epochs=1,
        batch_size=16,
        optimizer="adamw",
        lr=3e-3,
        progress="none",
        model="cnn",
        model_args={"spec": "c8,p,f16"},
        augment="none",
        precision="fp32",
        channels_last="off",
    )
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


# ---------------------------------------------------------------------------------------------- --grad-clip


def _grad_norms(into: list):
    """A callback: the global L2 norm of the gradients the optimiser just applied (they stay on the
    parameters until the next step's zero_grad)."""

    def callback(state):
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        into.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    return callback


def test_grad_clip_caps_the_global_gradient_norm_of_every_step(image_folder, tmp_path):
    clip = 0.05
    clipped, free = [], []
    fit(
        quick(image_folder, tmp_path / "clipped", grad_clip=clip, weight_decay=0.0),
        callbacks=[_grad_norms(clipped)],
        log=silent,
    )
    fit(quick(image_folder, tmp_path / "free", weight_decay=0.0), callbacks=[_grad_norms(free)], log=silent)
    assert len(clipped) == len(free) == STEPS_PER_EPOCH
    assert min(free) > clip  # so every step of the clipped run had something to clip
    # rescaled to the cap (not zeroed, not left alone)
    assert all(clip * 0.999 <= n <= clip * 1.001 for n in clipped), clipped


def test_grad_clip_keeps_a_huge_learning_rate_finite_and_bounds_each_update(image_folder, tmp_path):
    huge = dict(optimizer="sgd", lr=1e5, momentum=0.0, schedule="constant", weight_decay=0.0)
    with pytest.raises(TrainingError, match=r"the loss is nan; training stopped.*--grad-clip 1.0"):
        fit(quick(image_folder, tmp_path / "free", **huge), log=silent)
    clip, snapshots = 0.01, []

    def snapshot(state):
        snapshots.append(torch.cat([p.detach().flatten() for p in state.model.parameters()]).double())

    summary = fit(quick(image_folder, tmp_path / "clipped", grad_clip=clip, **huge), callbacks=[snapshot], log=silent)
    assert summary["steps"] == STEPS_PER_EPOCH and math.isfinite(summary["test_loss"])
    # plain SGD moves the weights by lr x the clipped gradient: never further than lr x C
    moves = [torch.linalg.vector_norm(b - a).item() for a, b in zip(snapshots, snapshots[1:])]
    assert len(moves) == STEPS_PER_EPOCH - 1 and all(n <= 1e5 * clip * 1.001 for n in moves), moves


# ---------------------------------------------------------------------------------------------- --max-steps


def _learning_rates(into: list):
    def callback(state):
        into.append(state.lr)

    return callback


@pytest.mark.parametrize("max_steps, epochs_column", [(10, ["1", "1.4286"]), (14, ["1", "2"])])
def test_max_steps_stops_after_exactly_that_many_steps_and_spans_the_schedule(
    image_folder, tmp_path, max_steps, epochs_column
):
    run, lrs = tmp_path / "run", []
    summary = fit(quick(image_folder, run, epochs=3, max_steps=max_steps), callbacks=[_learning_rates(lrs)], log=silent)
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


@pytest.mark.parametrize(
    "epochs, max_steps, drops",
    [
        (2, 64_000, (7, 10)),  # 14 steps run: 0.5 and 0.75 of them (10.5 rounds to even)
        (3, 12, (6, 9)),  # capped like the paper's 64k iterations: fractions of the 12 steps run, not of 21
    ],
)
def test_he2016_recipe_divides_the_learning_rate_at_half_and_three_quarters_of_the_steps_run(
    image_folder, tmp_path, epochs, max_steps, drops
):
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
    code, out, err = cli(
        capsys,
        "train",
        "--recipe",
        "he2016",
        "--dataset",
        "imagefolder",
        "--data-dir",
        image_folder,
        "--model",
        "cnn",
        "--model-arg",
        "spec=c8,p,f16",
        "--batch-size",
        16,
        "--epochs",
        3,
        "--max-steps",
        12,
        "--precision",
        "fp32",
        "--channels-last",
        "off",
        "--progress",
        "none",
        "--no-report",
        "--run-dir",
        run,
    )
    assert code == 0, err
    assert "12 steps (1.71 epochs)" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["lr"], saved["weight_decay"], saved["max_steps"], saved["epochs"]) == (0.1, 1e-4, 12, 3)
    # epoch 1 ends with step index 6, the first milestone (0.5 x 12); the partial epoch 2 at index 11
    assert [(r["epoch"], float(r["lr"])) for r in rows(run)] == [
        ("1", pytest.approx(0.01)),
        ("1.7143", pytest.approx(0.001)),
    ]
    assert summary_of(run)["steps"] == 12


# ---------------------------------------------------------------------------------------------- --eval-every


@pytest.mark.parametrize("eval_every, evaluated", [(2, [2, 4, 5]), (0, [5])])
def test_eval_every_fills_the_test_columns_only_in_its_epochs_and_the_last(
    image_folder, tmp_path, eval_every, evaluated
):
    run = tmp_path / "run"
    fit(quick(image_folder, run, epochs=5, eval_every=eval_every, val_split=0.1, max_steps=0), log=silent)
    table = rows(run)
    assert [int(r["epoch"]) for r in table] == [1, 2, 3, 4, 5]
    for r in table:
        filled = int(r["epoch"]) in evaluated
        assert (r["test_acc"] != "", r["test_loss"] != "", r["val_acc"] != "", r["val_loss"] != "") == (filled,) * 4, r
    assert summary_of(run)["test_accuracy"] == float(table[-1]["test_acc"])


# ---------------------------------------------------------------------------------------------- --compile


@pytest.mark.slow  # inductor compiles the forward and backward graphs: about a minute on a shared 2-core CPU
def test_compile_trains_through_torch_compile_like_eager(image_folder, tmp_path, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def recording_compile(model, *args, **kwargs):
        compiled.append(model)
        return real_compile(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    kw = dict(optimizer="sgd", lr=0.05, augment="flip")
    eager = fit(quick(image_folder, tmp_path / "eager", **kw), log=silent)
    assert not compiled
    fast = fit(quick(image_folder, tmp_path / "compiled", compile=True, **kw), log=silent)
    assert len(compiled) == 1 and torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really ran
    a, b = load_file(tmp_path / "eager" / "model.safetensors"), load_file(tmp_path / "compiled" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)
    assert fast["test_accuracy"] == eager["test_accuracy"]
    assert yaml.safe_load((tmp_path / "compiled" / "config.yaml").read_text())["compile"] is True


# ---------------------------------------------------------------------------------------------- --threads


def test_threads_are_used_while_training_recorded_and_restored_afterwards(image_folder, tmp_path):
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    during = []
    summary = fit(
        quick(image_folder, tmp_path / "run", threads=wanted),
        callbacks=[lambda state: during.append(torch.get_num_threads())],
        log=silent,
    )
    assert during == [wanted] * STEPS_PER_EPOCH
    assert summary["threads"] == wanted and summary_of(tmp_path / "run")["threads"] == wanted
    assert torch.get_num_threads() == before
    # also when the run fails after the switch (a batch larger than the training split)
    with pytest.raises(ConfigError, match="lower --batch-size"):
        fit(quick(image_folder, tmp_path / "bad", threads=wanted, batch_size=1000), log=silent)
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------------- --precision


def _conv_output_dtypes(model_holder: list, into: list):
    """A callback that, at the first step, hooks the first conv to record the dtype it computes in."""

    def callback(state):
        if not model_holder:
            model_holder.append(state.model)
            conv = next(m for m in state.model.modules() if isinstance(m, torch.nn.Conv2d))
            conv.register_forward_hook(lambda m, i, out: into.append(out.dtype) if m.training else None)

    return callback


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_sets_the_dtype_of_training_and_is_recorded(image_folder, tmp_path, precision, dtype):
    seen, dtypes = [], []
    cfg = quick(image_folder, tmp_path / "run", precision=precision, epochs=2, model_args={"spec": "c8x2,p,f32"})
    summary = fit(cfg, callbacks=[_conv_output_dtypes(seen, dtypes)], log=silent)
    assert dtypes and set(dtypes) == {dtype}  # every step after the first, in training mode
    assert (summary["precision"], summary["precision_reason"]) == (precision, "asked for")
    assert summary["test_accuracy"] >= 0.9  # three well-separated classes; chance is 1/3
    weights = load_file(tmp_path / "run" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}  # autocast computes in bf16, keeps fp32 weights


def test_auto_precision_records_the_decision_measured_on_this_cpu(image_folder, tmp_path, private_cache):
    messages = []
    summary = fit(
        quick(image_folder, tmp_path / "run", precision="auto", channels_last="auto", threads=1), log=messages.append
    )
    probes = json.loads((private_cache / "probe.json").read_text())
    assert len(probes) == 1
    probe = next(iter(probes.values()))
    assert probe["threads"] == 1 and all(
        probe[k] > 0 for k in ("fp32_nchw_ms", "fp32_channels_last_ms", "bf16_channels_last_ms")
    )
    assert (summary["precision"], summary["precision_reason"]) == rt.decide_precision(probe)
    assert (summary["channels_last"], summary["channels_last_reason"]) == rt.decide_channels_last(
        probe, summary["precision"]
    )
    assert any(m.startswith("measured this CPU once") for m in messages)
    assert any(
        m.strip().startswith(f"precision {summary['precision']}: {summary['precision_reason']}") for m in messages
    )


def test_decide_precision_and_channels_last_from_injected_timings():
    probe = {"fp32_nchw_ms": 10.0, "fp32_channels_last_ms": 9.0, "flags": ["avx512_bf16"]}
    assert rt.decide_precision({**probe, "bf16_channels_last_ms": 7.5}) == (
        "bf16",
        "bf16 autocast measured 1.20x faster than fp32 on this CPU",
    )
    prec, why = rt.decide_precision({**probe, "bf16_channels_last_ms": 8.0})
    assert (
        prec == "fp32"
        and why.startswith("bf16 autocast measured 1.12x the speed of fp32")
        and ">= 1.2x" in why
        and "avx512_bf16" in why
    )
    assert rt.decide_precision({**probe, "bf16_channels_last_ms": 20.0, "flags": []})[1].endswith("flags: none)")
    assert rt.decide_channels_last(probe, "bf16") == (True, "bf16 kernels of oneDNN work in channels_last")
    assert rt.decide_channels_last(probe, "fp32") == (True, "channels_last measured 1.11x faster than NCHW on this CPU")
    assert rt.decide_channels_last({**probe, "fp32_channels_last_ms": 9.6}, "fp32") == (
        False,
        "channels_last measured 1.04x the speed of NCHW on this CPU",
    )


def test_cpu_probe_is_measured_once_per_thread_count_and_cached(monkeypatch, private_cache):
    calls = []

    def fake_steps_ms(rounds=5):
        calls.extend(["fp32 NCHW", "fp32 channels_last", "bf16 channels_last"])
        return {"fp32_nchw_ms": 10.0, "fp32_channels_last_ms": 8.0, "bf16_channels_last_ms": 5.0}

    monkeypatch.setattr(rt, "_probe_steps_ms", fake_steps_ms)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = rt.probe_cpu()
        assert len(calls) == 3 and first["threads"] == 1
        assert rt.probe_cpu() == first and len(calls) == 3  # from the cache file
        assert rt.pick_precision("auto", torch.device("cpu")) == (
            "bf16",
            "bf16 autocast measured 1.60x faster than fp32 on this CPU",
        )
        torch.set_num_threads(2)
        assert rt.probe_cpu()["threads"] == 2 and len(calls) == 6  # another thread count: measured again
    finally:
        torch.set_num_threads(before)
    assert len(json.loads((private_cache / "probe.json").read_text())) == 2
    (private_cache / "probe.json").write_text("{not json")
    torch.set_num_threads(1)
    try:
        assert rt.probe_cpu() == first and len(calls) == 9  # a damaged cache is measured over, not trusted
    finally:
        torch.set_num_threads(before)
    assert len(json.loads((private_cache / "probe.json").read_text())) == 1


# ---------------------------------------------------------------------------------------------- --device


def test_device_cpu_trains_on_the_cpu_and_is_recorded(image_folder, tmp_path):
    devices = []
    summary = fit(
        quick(image_folder, tmp_path / "run", device="cpu"),
        callbacks=[lambda state: devices.append(next(state.model.parameters()).device.type)],
        log=silent,
    )
    assert devices == ["cpu"] * STEPS_PER_EPOCH
    assert summary["device"] == rt.device_name(torch.device("cpu"))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["device"] == "cpu"


@pytest.mark.parametrize(
    "device, message",
    [
        pytest.param(
            "cuda",
            "device 'cuda' asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        pytest.param(
            "cuda:7",
            "device 'cuda:7' asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        pytest.param(
            "mps",
            "device 'mps' asked for, but PyTorch sees no Apple GPU (MPS); use --device cpu or auto",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS"),
        ),
        ("cudax", "device 'cudax' is not a device name; use auto, cpu, cuda or cuda:N"),
    ],
)
def test_a_device_this_machine_lacks_is_refused_before_any_work(tmp_path, capsys, device, message):
    run = tmp_path / "run"
    # a dataset folder that does not exist: the device must be refused first
    code, out, err = cli(
        capsys,
        "train",
        "--device",
        device,
        "--dataset",
        "imagefolder",
        "--data-dir",
        tmp_path / "missing",
        "--model",
        "cnn",
        "--model-arg",
        "spec=c8,p,f16",
        "--progress",
        "none",
        "--no-report",
        "--run-dir",
        run,
    )
    assert code == 2 and err.strip() == f"error: {message}" and out == ""
    assert not run.exists()


def test_a_cuda_index_beyond_the_machine_s_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rt.pick_device("cuda:1") == torch.device("cuda", 1)
    assert rt.pick_device("cuda", local_rank=3) == torch.device("cuda", 1)
    with pytest.raises(
        ConfigError,
        match=r"device 'cuda:2' asked for, but this machine has 2 CUDA GPU\(s\), "
        r"cuda:0 to cuda:1; use --device cuda or one of those",
    ):
        rt.pick_device("cuda:2")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_cuda_trains_on_the_gpu(image_folder, tmp_path):
    devices = []
    summary = fit(
        quick(image_folder, tmp_path / "run", device="cuda", epochs=3, model_args={"spec": "c8x2,p,f32"}),
        callbacks=[lambda state: devices.append(next(state.model.parameters()).device.type)],
        log=silent,
    )
    assert set(devices) == {"cuda"} and summary["device"] == torch.cuda.get_device_name()
    assert summary["test_accuracy"] >= 0.9


# ---------------------------------------------------------------------------------------------- --resume fallback


def test_a_damaged_last_checkpoint_is_reported_kept_and_resumed_from_previous_on_the_command_line(
    image_folder, tmp_path, capsys
):
    run = tmp_path / "run"
    kw = dict(schedule="constant", augment="flip", progress="none")  # constant: the run may be extended
    fit(quick(image_folder, tmp_path / "reference", epochs=3, **kw), log=silent)
    fit(quick(image_folder, run, epochs=2, **kw), log=silent)
    last = run / "last.ckpt"
    damaged = bytearray(last.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    last.write_bytes(bytes(damaged))

    code, out, err = cli(capsys, "train", "--resume", run, "--epochs", 3, "--no-report")
    assert code == 0, err
    assert (
        f"warning: {last}: checksum mismatch: the file is truncated or corrupt; trying the previous checkpoint" in out
    )
    assert f"resuming {run} at epoch 2, step {STEPS_PER_EPOCH}" in out
    assert (run / "last.ckpt.damaged").read_bytes() == bytes(damaged)
    assert read_checkpoint(last)["step"] == 3 * STEPS_PER_EPOCH
    assert same_weights(tmp_path / "reference", run)
    assert [r["epoch"] for r in rows(run)] == ["1", "2", "3"]
