"""What a newcomer hit in the first hour, following the README (issue 9's findings), each as it now behaves."""

import json

import pytest
import torch

from cnnlab.cli import main
from cnnlab.engine import TrainConfig, fit
from cnnlab.errors import ConfigError
from cnnlab.training.state import rng_state, set_rng_state


def silent(message):
    pass


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained on an image folder given with --data-dir, as a CIFAR run with ../shared/datasets would be."""
    from conftest import write_image_folder

    tmp = tmp_path_factory.mktemp("newcomer")
    root = write_image_folder(tmp / "shapes")
    cache = tmp / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNNLAB_CACHE", str(cache))
        fit(
            TrainConfig(
                dataset="imagefolder",
                data_dir=str(root),
                run_dir=str(tmp / "run"),
                epochs=1,
                batch_size=16,
                model="cnn",
                model_args={"spec": "c8,p,f16"},
                progress="none",
                report=False,
            ),
            log=silent,
        )
    return tmp / "run", root, cache


def test_eval_of_a_run_finds_the_data_where_the_run_found_it(trained, capsys, monkeypatch):
    run, _, cache = trained
    monkeypatch.setenv("CNNLAB_CACHE", str(cache))
    code, out, _ = run_cli(capsys, "eval", run, "--json")  # no --data-dir: the run's config.yaml says where
    assert code == 0
    result = json.loads(out.splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    # eval computes in fp32 (as predict and an exported model do), whatever training's measured choice was; an image
    # near a decision boundary may flip when training evaluated in bf16
    assert result["precision"] == "fp32"
    flips = 0 if summary["precision"] == "fp32" else 1
    assert abs(result["accuracy"] - summary["test_accuracy"]) <= flips / result["n"] + 1e-9


def test_a_model_too_large_for_the_images_is_refused_before_any_work_and_leaves_no_folder(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--model", "alexnet", "--dataset", "cifar10", "--run-dir", tmp_path / "r")
    assert code == 2
    assert "model 'alexnet' needs input of at least 63x63 pixels, but cifar10 gives 32x32" in err
    assert "--image-size 63" in err and not (tmp_path / "r").exists()
    code, _, err = run_cli(capsys, "summary", "alexnet", "--input-size", "3,32,32")
    assert code == 2 and "at least 63x63 pixels, but --input-size gives 32x32" in err


def test_image_size_upsamples_the_batches_so_that_such_a_model_can_train(trained, tmp_path):
    _, root, _ = trained
    summary = fit(
        TrainConfig(
            dataset="imagefolder",
            data_dir=str(root),
            run_dir=str(tmp_path / "r"),
            epochs=1,
            batch_size=16,
            model="alexnet",
            image_size=64,
            max_steps=2,
            progress="none",
            report=False,
        ),
        log=silent,
    )
    assert summary["steps"] == 2
    assert json.loads((tmp_path / "r" / "model.json").read_text())["input_shape"] == [3, 64, 64]


def test_max_steps_mid_epoch_reports_the_steps_writes_a_row_and_times_the_training(trained, tmp_path, capsys):
    _, root, _ = trained
    code, out, _ = run_cli(
        capsys,
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        root,
        "--model",
        "cnn",
        "--model-arg",
        "spec=c8,p,f16",
        "--batch-size",
        "16",
        "--max-steps",
        "4",
        "--run-dir",
        tmp_path / "r",
        "--progress",
        "none",
        "--no-report",
    )
    assert code == 0 and "after 4 steps (0.57 epochs)" in out
    rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("0.5714,")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["train_seconds"] > 0 and summary["epochs"] == pytest.approx(4 / 7, abs=1e-4)


def test_your_own_images_are_not_called_unverified(trained):
    from cnnlab.data import load_dataset

    _, root, _ = trained
    text = load_dataset("imagefolder", root).describe()
    assert "UNVERIFIED" not in text and "your own files" in text


def test_an_unknown_flag_suggests_the_nearest(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--lrr", "0.1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--lrr (did you mean --lr" in err and "cnnlab train" in err


def test_predict_refuses_top_k_zero(trained, capsys):
    run, root, _ = trained
    code, _, err = run_cli(capsys, "predict", run, root / "test", "--top-k", "0")
    assert code == 2 and "--top-k 0" in err


def test_data_info_writes_a_montage_only_where_asked(trained, tmp_path, capsys, monkeypatch):
    _, root, cache = trained
    monkeypatch.setenv("CNNLAB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "data", "info", "imagefolder", "--data-dir", root)
    assert code == 0 and "--out" in out and not list(tmp_path.glob("*.png"))
    code, out, _ = run_cli(capsys, "data", "info", "imagefolder", "--data-dir", root, "--out", tmp_path / "m.png")
    assert code == 0 and (tmp_path / "m.png").is_file()


def test_the_models_table_keeps_its_columns_aligned(capsys):
    code, out, _ = run_cli(capsys, "models")
    rows = [line for line in out.splitlines()[1:] if line and not line.startswith("(")]
    header = out.splitlines()[0]
    start = header.index("params") + len("params")  # right-aligned column: every row ends it at the same place
    assert code == 0 and all(row[start - 1].isdigit() for row in rows), rows


def test_checkpoints_hold_only_the_generator_of_the_device_in_use_and_another_device_resumes_with_a_note():
    state = rng_state(torch.device("cpu"))
    assert "cuda" not in state  # even where CUDA is present: a CPU run saves no GPU generator
    with_gpu = {**state, "cuda": torch.zeros(16, dtype=torch.uint8)}
    assert "unused on this device" in set_rng_state(with_gpu, torch.device("cpu"))
    assert set_rng_state(state, torch.device("cpu")) is None


def test_config_errors_name_the_value_and_the_fix():
    with pytest.raises(ConfigError, match=r"image_size = -3 is invalid: it must be 0 \(the data's size\)"):
        TrainConfig(image_size=-3).validate()
