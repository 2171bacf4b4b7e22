"""`--precision auto` / `--channels-last auto` decided on the run's own model at its input size."""

import json

import torch
import torch.nn as nn
from safetensors.torch import load_file

from cnnlab.engine import TrainConfig, fit
from cnnlab.engine import runtime as rt


def silent(message):
    pass


def _tiny():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def test_the_model_probe_measures_each_setting_and_caches_per_model_and_shape(private_cache, monkeypatch):
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    probe = rt.probe_model(model, (3, 16, 16), 8, name="tiny", args={"width": 4}, budget_s=0.5)
    assert all(probe[k] > 0 for k in ("fp32_nchw_ms", "fp32_channels_last_ms", "bf16_channels_last_ms"))
    assert probe["rounds"] >= 1 and probe["batch"] == 8 and probe["threads"] == torch.get_num_threads()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # copies were measured
    assert torch.equal(torch.get_rng_state(), rng)  # and the run's generator was not advanced
    calls = []
    monkeypatch.setattr(
        rt,
        "_model_steps_ms",
        lambda *a: (
            calls.append(a)
            or dict(fp32_nchw_ms=1.0, fp32_channels_last_ms=1.0, bf16_channels_last_ms=1.0, rounds=1, batch=8)
        ),
    )
    assert rt.probe_model(model, (3, 16, 16), 8, name="tiny", args={"width": 4}) == probe and not calls  # cached
    rt.probe_model(model, (3, 32, 32), 8, name="tiny", args={"width": 4})
    rt.probe_model(model, (3, 16, 16), 8, name="tiny", args={"width": 8})
    assert len(calls) == 2  # another input shape, other arguments: measured again
    assert rt.probe_model(model, (3, 64, 64), 8, name="tiny", args={}, measure=False) is None
    assert len(json.loads((private_cache / "probe.json").read_text())) == 3


def _fake_timings(monkeypatch, stand_in: dict, model: dict):
    """The stand-in probe and the model probe each report fixed step times (ms)."""
    monkeypatch.setattr(rt, "_probe_steps_ms", lambda rounds=5: dict(stand_in))
    monkeypatch.setattr(rt, "_model_steps_ms", lambda *a: {**model, "rounds": 5, "batch": a[2]})


# The stand-in says bf16 + channels_last; the model itself is fastest in fp32 NCHW (what issue 23 saw).
STAND_IN = dict(fp32_nchw_ms=10.0, fp32_channels_last_ms=9.0, bf16_channels_last_ms=5.0)
MODEL = dict(fp32_nchw_ms=8.0, fp32_channels_last_ms=10.0, bf16_channels_last_ms=10.0)


def test_a_long_enough_run_takes_what_its_own_model_measured(monkeypatch):
    _fake_timings(monkeypatch, STAND_IN, MODEL)
    with rt.start_runtime("cpu", "auto", "auto") as runtime:
        assert (runtime.precision, runtime.channels_last) == ("bf16", True)  # the stand-in's provisional answer
        changed = rt.settle_for_model(
            runtime, _tiny(), (3, 16, 16), 32, run_images=1e6, name="tiny", args={}, log=silent
        )
        assert changed and (runtime.precision, runtime.channels_last) == ("fp32", False)
        assert (
            runtime.precision_reason == "bf16 autocast measured 0.80x the speed of fp32 for tiny at 3x16x16 on "
            "this CPU (bf16 needs >= 1.2x; flags: " + ", ".join(rt.cpu_flags() or ["none"]) + ")"
        )
        assert (
            runtime.channels_last_reason == "channels_last measured 0.80x the speed of NCHW for tiny at 3x16x16 "
            "on this CPU"
        )
        assert runtime.as_dict()["precision_probe"]["fp32_nchw_ms"] == 8.0


def test_a_run_shorter_than_the_probe_keeps_the_stand_in_unless_the_model_is_cached(monkeypatch):
    _fake_timings(monkeypatch, STAND_IN, MODEL)
    messages = []
    with rt.start_runtime("cpu", "auto", "auto") as runtime:
        short = 2 * 3 * 6 * 32 - 1  # one image less than twice the probe's
        assert not rt.settle_for_model(
            runtime, _tiny(), (3, 16, 16), 32, short, name="tiny", args={}, log=messages.append
        )
        assert (runtime.precision, runtime.channels_last) == ("bf16", True) and runtime.probe is None
        assert runtime.precision_reason == "bf16 autocast measured 1.80x faster than fp32 on this CPU"
        assert not messages  # nothing measured, nothing said
        rt.probe_model(_tiny(), (3, 16, 16), 32, name="tiny", args={})  # measured once, by a longer run
        assert rt.settle_for_model(runtime, _tiny(), (3, 16, 16), 32, short, name="tiny", args={}, log=silent)
        assert (runtime.precision, runtime.channels_last) == ("fp32", False)


def test_explicit_settings_are_never_probed(monkeypatch):
    monkeypatch.setattr(rt, "_model_steps_ms", lambda *a: (_ for _ in ()).throw(AssertionError("probed")))
    with rt.start_runtime("cpu", "fp32", "off") as runtime:
        assert not rt.settle_for_model(runtime, _tiny(), (3, 16, 16), 32, 1e9, name="tiny", args={})


def test_a_run_switched_by_its_probe_trains_bitwise_as_one_given_those_settings(image_folder, tmp_path, monkeypatch):
    _fake_timings(monkeypatch, STAND_IN, MODEL)
    monkeypatch.setattr(rt, "MODEL_PROBE_MIN_RUN", 0)  # the test run is tiny
    base = dict(
        dataset="imagefolder",
        data_dir=str(image_folder),
        epochs=2,
        batch_size=16,
        progress="none",
        model="cnn",
        model_args={"spec": "c8x2,p,f32"},
        augment="crop:2:reflect,flip",
        optimizer="adamw",
        lr=3e-3,
    )
    messages = []
    auto = fit(TrainConfig(**base, run_dir=str(tmp_path / "auto")), log=messages.append)
    assert (auto["precision"], auto["channels_last"]) == ("fp32", False)
    assert "for cnn at 3x16x16" in auto["precision_reason"] and auto["precision_probe"]["model"] == "cnn"
    assert any(m.strip().startswith(f"precision fp32: {auto['precision_reason']}") for m in messages)
    given = fit(TrainConfig(**base, run_dir=str(tmp_path / "given"), precision="fp32", channels_last="off"), log=silent)
    a, b = load_file(tmp_path / "auto" / "model.safetensors"), load_file(tmp_path / "given" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and auto["test_accuracy"] == given["test_accuracy"]
