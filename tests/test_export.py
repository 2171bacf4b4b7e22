"""`cnnlab export`: every registered model through ONNX and torch.export, the CLI end to end, and the exported
file against `cnnlab predict` on real image files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import cnnlab
from cnnlab.cli import main
from cnnlab.inference.export import (
    DEFAULT_TOLERANCE,
    FP32_ERROR_FACTOR,
    ExportError,
    WithNormalisation,
    capture,
    check_exported,
    compare_with_predict,
    export_metadata,
    export_model,
    onnx_bytes,
    pt2_bytes,
    pytorch_fp32_error,
    run_onnx,
    run_pt2,
)
from cnnlab.inference.predict import expand_inputs
from cnnlab.inference.weights import LoadedModel, load_weights
from cnnlab.models.registry import accepts

# Capped input sizes keep the registry sweep fast: the graph is the same at any size the model accepts.
# One model per family in the default suite (each takes 5-15 s of CPU: the ONNX translation dominates); the
# rest, deeper copies of the same blocks, in the slow suite.
FAST = {"convnet", "convnet_module", "cnn", "resnet20", "resnet18"}
# resnet1202 is resnet20's block 200 times over and takes up to a quarter of an hour to trace on 2 cores;
# resnet20, 56 and 110 cover its graph.
LEFT_OUT = {"resnet1202"}


def _input_shape(name: str) -> tuple[int, int, int]:
    if accepts(name, "input_size"):
        return 1, 28, 28
    if name == "alexnet":
        return 3, 63, 63  # the smallest input its three max-pools accept; the 1x1 map is pooled up to 6x6
    native = getattr(cnnlab.create_model(name, num_classes=2), "input_size", (224, 224))
    return (3, 32, 32) if native[0] <= 32 else (3, 64, 64)


def _random_model(name: str, shape, num_classes: int = 10) -> LoadedModel:
    """Random weights and BatchNorm statistics measured on a random batch, as training leaves them: a graph that
    normalised with batch statistics would be caught, and resnet1202's logits stay finite (with the initial
    statistics, mean 0 and variance 1, its activations overflow fp32)."""
    kwargs = {"num_classes": num_classes}
    if accepts(name, "input_size"):
        kwargs.update(in_channels=shape[0], input_size=list(shape[1:]))
    torch.manual_seed(0)
    model = cnnlab.create_model(name, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.momentum = None  # running statistics = the average over the calibration batch
    with torch.no_grad():
        model.train()(torch.rand(16, *shape))
    model.eval()
    meta = {
        "model": name,
        "classes": [f"class{i}" for i in range(num_classes)],
        "mean": [0.4] * shape[0],
        "std": [0.25] * shape[0],
        "input_shape": list(shape),
    }
    return LoadedModel(model, meta, Path("unused/model.safetensors"))


@pytest.mark.parametrize(
    "name",
    [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in cnnlab.list_models() if n not in LEFT_OUT],
)
def test_every_registered_model_exports_to_onnx_and_pt2(name):
    shape = _input_shape(name)
    loaded = _random_model(name, shape)
    reference = WithNormalisation(loaded.model, loaded.mean, loaded.std).eval()
    program = capture(reference, shape)
    metadata = export_metadata(loaded)
    inputs = torch.rand(9, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        top2 = reference(inputs).topk(2, dim=1).values
    for fmt, run in (("onnx", run_onnx(onnx_bytes(program, metadata))), ("pt2", run_pt2(pt2_bytes(program, metadata)))):
        result = check_exported(reference, run, inputs)  # batch 9, then batch 1
        assert result["batch_sizes"] == (9, 1)
        # export_model's rule: within the tolerance, or (deep plain nets amplify rounding) within a few times
        # PyTorch's own fp32 error against float64
        if result["max_abs_diff"] > DEFAULT_TOLERANCE * result["logit_scale"]:
            assert result["max_abs_diff"] <= FP32_ERROR_FACTOR * pytorch_fp32_error(reference, inputs), (fmt, result)
        clear = int((top2[:, 0] - top2[:, 1] > 2 * result["max_abs_diff"]).sum())  # no near-tie to flip
        assert result["top1_agree"] >= clear, (fmt, result)


def test_a_graph_without_the_normalisation_is_refused_at_the_default_tolerance():
    """The tolerance separates fp32 noise from a real export fault."""
    shape = (3, 32, 32)
    loaded = _random_model("resnet20", shape)
    reference = WithNormalisation(loaded.model, loaded.mean, loaded.std).eval()
    wrong = run_onnx(onnx_bytes(capture(loaded.model, shape), export_metadata(loaded)))
    inputs = torch.rand(8, *shape)
    result = check_exported(reference, wrong, inputs)
    assert result["max_abs_diff"] > 100 * DEFAULT_TOLERANCE * result["logit_scale"]
    assert result["max_abs_diff"] > 100 * FP32_ERROR_FACTOR * pytorch_fp32_error(reference, inputs)


def cnnlab_cli(*args, env, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "cnnlab", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"cnnlab {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny convnet trained for a few seconds through the CLI on the image-folder fixture, exported to ONNX."""
    from conftest import write_image_folder

    tmp = tmp_path_factory.mktemp("export")
    root = write_image_folder(tmp / "shapes")
    run = tmp / "run"
    env = {"CNNLAB_CACHE": str(tmp / "cache")}
    cnnlab_cli(
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
        "none",
        "--no-report",
        env=env,
    )
    exported = cnnlab_cli("export", run, env=env)
    return run, root, env, exported


def test_export_writes_onnx_with_metadata_and_a_dynamic_batch(trained_run):
    run, _, _, exported = trained_run
    path = run / "model.onnx"
    assert f"{path}: cnn as ONNX opset 18" in exported.stdout
    assert "on 30 test images of imagefolder at batch 30 and 1" in exported.stdout
    assert "top-1 agreement 30/30" in exported.stdout
    model = onnx.load(path)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["classes"]) == ["circle", "square", "stripe"]
    assert json.loads(props["input_shape"]) == [3, 16, 16] and props["model"] == "cnn"
    assert props["cnnlab_version"] == cnnlab.__version__
    sidecar = json.loads((run / "model.json").read_text())
    assert json.loads(props["mean"]) == sidecar["mean"] and json.loads(props["std"]) == sidecar["std"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 16, 16]
    run_model = run_onnx(path.read_bytes())
    for n in (1, 64):
        assert run_model(np.random.rand(n, 3, 16, 16).astype(np.float32)).shape == (n, 3)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_onnx_agrees_with_cnnlab_predict_at_batch_1_and_64(trained_run, monkeypatch):
    run, root, env, _ = trained_run
    images = expand_inputs([root / "test"])
    predicted = json.loads(cnnlab_cli("predict", run, root / "test", "--top-k", "3", "--json", env=env).stdout)
    loaded = load_weights(run)
    report = compare_with_predict(run / "model.onnx", loaded, images, predicted["results"])
    assert report["images"] == 30 and set(report["batches"]) == {1, 64}
    # predict runs in bf16 autocast where this CPU measured it faster: three significant digits, not fp32's seven
    bound = 1e-3 if report["predict_precision"] == "fp32" else 1e-2
    for batch in report["batches"].values():
        assert batch["top1_agree"] == 30 and batch["max_prob_diff"] <= bound, report
    # predict in fp32, as on a CPU without native bf16: the promise of 1e-3 holds with a wide margin
    report = compare_with_predict(run / "model.onnx", loaded, images, precision="fp32")
    assert report["predict_precision"] == "fp32"
    for batch in report["batches"].values():
        assert batch["top1_agree"] == 30 and batch["max_prob_diff"] <= 1e-5, report


def test_export_pt2_writes_the_metadata_beside_it(trained_run, capsys):
    run, root, _, _ = trained_run
    assert main(["export", str(run), "--format", "pt2", "--data-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"metadata: {run / 'model.pt2.json'}" in out and "top-1 agreement 30/30" in out
    meta = json.loads((run / "model.pt2.json").read_text())
    assert meta["classes"] == ["circle", "square", "stripe"] and meta["input_shape"] == [3, 16, 16]
    extra = {"cnnlab.json": ""}
    module = torch.export.load(run / "model.pt2", extra_files=extra).module()
    assert json.loads(extra["cnnlab.json"]) == meta
    loaded = load_weights(run)
    x = torch.rand(64, 3, 16, 16)
    with torch.no_grad():
        want = loaded.model(loaded.normalise((x * 255).round().to(torch.uint8)))
        x = (x * 255).round() / 255  # the same pixels as predict sees them
        assert torch.allclose(module(x), want, atol=1e-5) and module(x[:1]).shape == (1, 3)


def test_a_refused_export_exits_2_and_leaves_the_old_file(trained_run, tmp_path, capsys, monkeypatch):
    run, root, _, _ = trained_run
    import cnnlab.inference.export as export

    exact = export.run_onnx

    def faulty(data):  # a runtime that is off by 0.01 on every logit
        run = exact(data)
        return lambda x: run(x) + 0.01

    monkeypatch.setattr(export, "run_onnx", faulty)
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    assert main(["export", str(run), "--out", str(out), "--data-dir", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"error: {out} not written: the exported onnx model's logits differ from PyTorch's by up to 0.01" in err
    assert "on 30 test images of imagefolder, above the tolerance 0.0001 x" in err
    assert "and above 4 x PyTorch's own fp32 error against float64" in err
    assert out.read_bytes() == b"previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_an_opset_the_exporter_cannot_write_is_refused(trained_run, tmp_path, capsys):
    run, root, _, _ = trained_run
    assert main(["export", str(run), "--opset", "7", "--out", str(tmp_path / "m.onnx"), "--data-dir", str(root)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --opset 7: the ONNX exporter cannot convert this model to that "
        "opset (it stays at 18); use the default 18 or another opset"
    )
    assert not list(tmp_path.iterdir())


def test_weights_away_from_their_dataset_are_checked_on_random_inputs(trained_run, tmp_path, capsys):
    run, _, _, _ = trained_run
    for name in ("model.safetensors", "model.json"):
        (tmp_path / name).write_bytes((run / name).read_bytes())
    assert main(["export", str(tmp_path / "model.safetensors")]) == 0
    assert "on 64 random inputs (imagefolder not found) at batch 64 and 1" in capsys.readouterr().out
    assert (tmp_path / "model.onnx").is_file()


def test_missing_onnx_packages_name_the_extra(trained_run, tmp_path, monkeypatch, capsys):
    run, _, _, _ = trained_run
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if it were not installed
    assert main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: ONNX export needs onnx, onnxscript and onnxruntime: pip install 'cnnlab[onnx]'"
    )
    assert not list(tmp_path.iterdir())


def test_export_model_refuses_a_bad_destination(tmp_path):
    loaded = _random_model("convnet", (1, 28, 28))
    with pytest.raises(ExportError, match="no such folder"):
        export_model(loaded, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ExportError, match="is a folder"):
        export_model(loaded, tmp_path)
