"""The seams between training, evaluation, prediction and export, through the command line: one preprocessing
per run, recipes that mean what they say, runs that remember where their data was, files readable by others."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.cli import main


def write_non_square_folder(root: Path, per_class=(24, 8), seed=0) -> Path:
    """Photos of mixed, non-square sizes (landscape and portrait, JPEG and PNG): each class a bright bar in its
    own third, so that a crop or a squash changes what the model sees."""
    rng = np.random.default_rng(seed)
    sizes = [(48, 32), (30, 45), (40, 40), (56, 36)]
    for split, count in zip(("train", "test"), per_class):
        for k, name in enumerate(("left", "middle", "right")):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = sizes[(i + k) % len(sizes)]
                img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                img[:, k * w // 3 : (k + 1) * w // 3, :] += 120
                ext = "jpg" if i % 2 else "png"
                Image.fromarray(img).save(d / f"{i:03d}.{ext}", quality=90)
    return root


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


def train_folder(capsys, root: Path, run_dir: Path, *extra) -> None:
    code, _ = run_cli(
        capsys,
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        root,
        "--model",
        "cnn",
        "--model-arg",
        "spec=c8,p,c8,g",
        "--epochs",
        1,
        "--batch-size",
        16,
        "--progress",
        "none",
        "--no-report",
        "--workers",
        0,
        "--run-dir",
        run_dir,
        "--threads",
        1,
        *extra,
    )
    assert code == 0


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_predict_on_the_test_images_gives_what_eval_recorded_per_image(mode, tmp_path, capsys):
    root = write_non_square_folder(tmp_path / "photos")
    run = tmp_path / f"run-{mode}"
    train_folder(capsys, root, run, "--data-mode", mode, "--image-size", 24)
    sidecar = json.loads((run / "model.json").read_text())
    want_rule = "shorter" if mode == "stream" else "shorter"
    assert sidecar["preprocess"]["resize"] == want_rule and sidecar["preprocess"]["size"] == [24, 24]
    assert sidecar["preprocess"]["resize_to"] == (27 if mode == "stream" else 24)  # 24 / 0.875, or the square

    code, out = run_cli(capsys, "eval", run, "--json")
    assert code == 0
    evaluated = json.loads(out)
    assert evaluated["precision"] == "fp32" and len(evaluated["files"]) == 24
    code, out = run_cli(capsys, "predict", run, *evaluated["files"], "--json", "--top-k", 3)
    assert code == 0
    predicted = {r["file"]: r["top"][0]["index"] for r in json.loads(out)["results"]}
    assert [predicted[f] for f in evaluated["files"]] == evaluated["predictions"]


def test_the_same_file_gives_the_same_pixels_in_training_eval_and_predict(tmp_path, capsys):
    from cnnlab.data import load_dataset
    from cnnlab.inference.predict import load_image
    from cnnlab.inference.weights import load_weights

    root = write_non_square_folder(tmp_path / "photos", per_class=(6, 3))
    run = tmp_path / "run"
    train_folder(capsys, root, run, "--image-size", 20, "--batch-size", 6, "--data-mode", "memory")
    loaded = load_weights(run)
    data = load_dataset("imagefolder", root, image_size=20)  # as training decoded it
    test_files = sorted((root / "test").rglob("*.*"))
    for i, path in enumerate(test_files):
        pixels, _ = load_image(path, loaded.preprocess)
        assert np.array_equal(pixels, data.test_images[i].numpy()), path


def test_exported_onnx_agrees_with_predict_at_its_defaults(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from cnnlab.inference.export import compare_with_predict
    from cnnlab.inference.weights import load_weights

    root = write_non_square_folder(tmp_path / "photos", per_class=(12, 4))
    run = tmp_path / "run"
    train_folder(capsys, root, run, "--image-size", 24, "--batch-size", 12)
    code, _ = run_cli(capsys, "export", run, "--format", "onnx")
    assert code == 0
    images = sorted(str(p) for p in (root / "test").rglob("*.*"))
    code, out = run_cli(capsys, "predict", run, *images, "--json", "--top-k", 3)  # default flags
    predicted = json.loads(out)["results"]
    report = compare_with_predict(run / "model.onnx", load_weights(run), images, predicted, batch_sizes=(1, 12))
    assert report["predict_precision"] == "fp32"
    for batch in report["batches"].values():
        assert batch["top1_agree"] == len(images)
        assert batch["max_prob_diff"] < 1e-4
    import onnx

    meta = {p.key: p.value for p in onnx.load(run / "model.onnx").metadata_props}
    assert json.loads(meta["preprocess"]) == load_weights(run).preprocess.to_dict()
    assert "shorter side to 27, centre 24x24" in meta["preprocess_outside_the_graph"]  # streamed: 24 / 0.875


def test_recipe_imagenet_scales_lr_with_the_batch_size_and_metrics_say_so(tmp_path, capsys):
    run = tmp_path / "run"
    code, _ = run_cli(
        capsys,
        "train",
        "--recipe",
        "imagenet",
        "--batch-size",
        512,
        "--model",
        "convnet",
        "--dataset",
        "synthetic-cifar",
        "--train-subset",
        1536,
        "--epochs",
        3,
        "--progress",
        "none",
        "--no-report",
        "--run-dir",
        run,
        "--threads",
        1,
        "--augment",
        "none",
    )
    assert code == 0
    from cnnlab.training.config import load_config

    assert load_config(run / "config.yaml").lr == pytest.approx(0.2)
    rows = (run / "metrics.csv").read_text().splitlines()
    header, first = rows[0].split(","), rows[1].split(",")
    assert float(first[header.index("lr")]) == pytest.approx(0.2)  # epoch 1: 3 of 9 steps, before the first milestone


def test_recipe_lr_given_by_flag_is_not_scaled(tmp_path):
    from cnnlab.training.recipes import build_config

    assert build_config("imagenet", flags={"batch_size": 512}).lr == pytest.approx(0.2)
    assert build_config("imagenet", flags={"batch_size": 512, "lr": 0.05}).lr == pytest.approx(0.05)
    assert build_config("imagenet", flags={"batch_size": 128}).lr == pytest.approx(0.05)
    config = tmp_path / "c.yaml"
    config.write_text("lr: 0.3\nbatch_size: 1024\n")
    assert build_config("imagenet", str(config)).lr == pytest.approx(0.3)


def test_airbench94_metrics_record_the_rates_sgd_applied(tmp_path, monkeypatch):
    import torch

    from cnnlab.engine import fit
    from cnnlab.training.recipes import build_config

    applied = []
    step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        applied.append({g.get("name", f"group{i}"): g["lr"] for i, g in enumerate(self.param_groups)})
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    cfg = build_config(
        "airbench94",
        flags={
            "dataset": "synthetic-cifar",
            "train_subset": 2048,
            "epochs": 2,
            "batch_size": 512,
            "progress": "none",
            "report": False,
            "run_dir": str(tmp_path / "run"),
            "threads": 1,
            "tta": 0,
        },
    )
    fit(cfg, log=lambda m: None)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(applied) == 8 and len(rows) == 3
    for epoch, row in enumerate(rows[1:]):
        values = dict(zip(header, row.split(",")))
        last = applied[4 * epoch + 3]  # the last step of the epoch
        groups = {k[3:]: float(v) for k, v in values.items() if k.startswith("lr/")}
        assert groups, "airbench94's groups train at different rates: each gets a column"
        assert set(groups) == set(last)
        for name, rate in last.items():
            assert groups[name] == pytest.approx(rate, rel=1e-6)
        assert float(values["lr"]) in [pytest.approx(r, rel=1e-6) for r in last.values()]
        assert max(last.values()) != pytest.approx(cfg.lr)  # not the schedule's paper-unit value


def test_a_run_with_a_relative_data_dir_is_evaluated_from_another_folder(tmp_path, capsys, monkeypatch):
    write_non_square_folder(tmp_path / "work" / "photos", per_class=(6, 3))
    monkeypatch.chdir(tmp_path / "work")
    train_folder(capsys, Path("photos"), Path("runs/r"), "--image-size", 16, "--batch-size", 6)
    config = (tmp_path / "work" / "runs" / "r" / "config.yaml").read_text()
    assert "data_dir: photos" in config and f"data_dir_resolved: {tmp_path / 'work' / 'photos'}" in config
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out = run_cli(capsys, "eval", tmp_path / "work" / "runs" / "r", "--json")
    assert code == 0 and json.loads(out)["n"] == 9
    code, out = run_cli(capsys, "report", tmp_path / "work" / "runs" / "r")
    assert code == 0


def test_checkpoints_weights_and_the_dataset_cache_are_readable_by_others_under_umask_022(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        root = write_non_square_folder(tmp_path / "photos", per_class=(6, 3))
        run = tmp_path / "run"
        train_folder(capsys, root, run, "--image-size", 16, "--batch-size", 6, "--data-mode", "memory")
    finally:
        os.umask(old)
    cache = Path(os.environ["CNNLAB_CACHE"])
    files = [
        run / "last.ckpt",
        run / "model.safetensors",
        run / "model.json",
        run / "config.yaml",
        run / "metrics.csv",
        run / "summary.json",
        *cache.rglob("*.safetensors"),
    ]
    assert len(files) > 6
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_eval_of_packaged_weights_without_their_data_says_how_to_point_at_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "nothing"))
    monkeypatch.chdir(tmp_path)
    code = main(["eval", "lenet5-mnist"])
    err = capsys.readouterr().err
    if code == 0:
        pytest.skip("MNIST is installed in a system folder here")
    assert code == 2 and "--data-dir" in err and "cnnlab data fetch mnist" in err
    assert err.count("\n") == 1


def test_packaged_commands_name_no_machine_folder(capsys):
    from cnnlab.models.packaged import list_packaged

    for entry in list_packaged():
        assert not any(part in entry.command for part in ("/work/", "/tmp/", "/home/", "/root/")), entry.command
        assert not entry.record["data"]["source"].startswith(("/work", "/tmp", "/home", "/root"))
