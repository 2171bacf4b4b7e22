"""Experiment loggers: driven as a training run drives them (hyperparameters, steps, epochs, summary, close, and a
resume from an earlier checkpoint), then read back with TensorBoard's and MLflow's own readers."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys

import pytest
import torch

from cnnlab.errors import ConfigError
from cnnlab.training.config import TrainConfig
from cnnlab.training.loggers import LoggerGroup, absolute_uri, build_loggers, check_loggers, flat_params, parse_loggers

STEPS_PER_EPOCH = 10


def require(module: str):
    """The package, or a skip; CI installs the test extra, which includes both loggers, so there it must exist."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is missing in CI: the 'test' extra in pyproject.toml should install it")
        pytest.skip(f"{module} is not installed (pip install 'cnnlab[tensorboard,mlflow]')")


def config(**changes) -> TrainConfig:
    return TrainConfig(**{"model_args": {"width": 32}, "milestones": [3, 5], "epochs": 2, "lr": 0.05, **changes})


def loss_at(step: int, offset: float = 0.0) -> float:
    return offset + 1.0 / step


def row(epoch: int, evaluated: bool) -> dict:
    """A metrics.csv row as the trainer writes it: test cells empty in epochs without an evaluation."""
    return {
        "epoch": epoch,
        "lr": 0.05,
        "train_loss": 1.0 / epoch,
        "train_acc": 0.5 + epoch / 10,
        "test_loss": 0.4 / epoch if evaluated else "",
        "test_acc": 0.6 + epoch / 10 if evaluated else "",
        "seconds": 2.0,
        "img_per_s": 640.0,
    }


def train(group: LoggerGroup, first_step: int, last_step: int, offset: float = 0.0, eval_every: int = 2) -> None:
    """Steps first_step..last_step as the trainer logs them, with an epoch row at each epoch's last step."""
    for step in range(first_step, last_step + 1):
        group.log_step(step, {"train_loss": torch.tensor(loss_at(step, offset)), "lr": 0.05})
        if step % STEPS_PER_EPOCH == 0:
            epoch = step // STEPS_PER_EPOCH
            group.log_epoch(epoch, step, row(epoch, evaluated=epoch % eval_every == 0))


SUMMARY = {
    "test_accuracy": 0.8,
    "test_loss": 0.2,
    "test_top5": None,
    "epochs": 2,
    "steps": 20,
    "wall_seconds": 4.5,
    "device": "cpu",
    "versions": {"torch": torch.__version__},
    "deterministic": {"requested": False},
}


# ---------------------------------------------------------------- names and packages


def test_logger_names_are_parsed_from_a_comma_separated_list():
    assert parse_loggers("csv, TensorBoard,,tensorboard") == ["csv", "tensorboard"]
    assert parse_loggers(["mlflow", "csv,tensorboard"]) == ["mlflow", "csv", "tensorboard"]
    assert parse_loggers("") == []


def test_an_unknown_logger_is_refused_listing_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        check_loggers("tensorboard,wandb")
    assert str(info.value) == (
        "unknown logger 'wandb'; choose from csv, tensorboard, mlflow "
        "(several comma-separated, e.g. 'tensorboard,mlflow')"
    )


@pytest.mark.parametrize(
    "logger, module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("mlflow", "sqlalchemy")]
)
def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch, logger, module):
    for installed in ("tensorboard", "mlflow", "sqlalchemy", "alembic"):
        # Import what is there first, so that only `module` goes missing and comes back whole afterwards
        # (mlflow imported while SQLAlchemy is hidden would remember, for the session, that SQLite cannot be used).
        with contextlib.suppress(ImportError):
            importlib.import_module(installed)
    monkeypatch.setitem(sys.modules, module, None)  # what Python does for a package that is not installed
    with pytest.raises(ConfigError) as info:
        check_loggers(["csv", logger])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"logger '{logger}' needs the {module} package, which cannot be imported (")
    assert message.endswith(f"install it with: pip install 'cnnlab[{logger}]'")


def test_csv_alone_builds_no_logger_and_writes_nothing(tmp_path):
    group = build_loggers("csv", tmp_path, config=config(), resume=False, start_step=0)
    assert group.loggers == []
    train(group, 1, 20)
    group.log_summary(SUMMARY)
    group.close()
    assert list(tmp_path.iterdir()) == []


def test_the_config_becomes_flat_hyperparameters():
    params = flat_params(config())
    assert params["lr"] == 0.05 and params["epochs"] == 2 and params["nesterov"] is True
    assert params["model_args.width"] == 32 and "model_args" not in params
    assert params["milestones"] == "[3, 5]" and params["run_dir"] == "None"
    assert flat_params({"model_args": {}}) == {"model_args": "{}"}
    assert set(params) >= {"model", "dataset", "batch_size", "schedule", "seed"}


# ---------------------------------------------------------------- the group: batching, tensors, status


class Recorder:
    """A logger that remembers what it was handed."""

    def __init__(self):
        self.batches, self.flushes, self.status = [], 0, None

    def log_points(self, points):
        self.batches.append([(step, dict(values)) for step, _, values in points])

    def flush(self):
        self.flushes += 1

    def close(self, status):
        self.status = status


def test_step_points_reach_the_loggers_in_batches_as_floats():
    recorder = Recorder()
    group = LoggerGroup([recorder], flush_secs=3600, flush_steps=4)
    train(group, 1, 12)
    group.close()
    sizes = [len(batch) for batch in recorder.batches]
    # every 4 steps, and at each epoch end (step 10: steps 9-10 and the epoch row), then 11-12 on close
    assert sizes == [4, 4, 3, 2]
    points = [p for batch in recorder.batches for p in batch]
    losses = [(step, values["step/train_loss"]) for step, values in points if "step/train_loss" in values]
    assert losses == [(s, pytest.approx(loss_at(s))) for s in range(1, 13)]
    assert all(type(v) is float for _, values in points for k, v in values.items() if k.startswith("step/"))
    epoch_row = points[10][1]
    assert points[10][0] == 10 and epoch_row["epoch/epoch"] == 1 and epoch_row["epoch/train_loss"] == 1.0
    assert "epoch/test_loss" not in epoch_row and "epoch/test_acc" not in epoch_row  # no evaluation in epoch 1
    assert recorder.flushes == 1 and recorder.status == "KILLED"  # closed before any summary: a resumable stop


def test_the_summary_keeps_its_numbers_and_ends_the_run_finished():
    recorder = Recorder()
    with LoggerGroup([recorder]) as group:
        train(group, 1, 20)
        group.log_summary(SUMMARY)
    step, values = recorder.batches[-1][-1]
    assert step == 20
    assert values == {
        "summary/test_accuracy": 0.8,
        "summary/test_loss": 0.2,
        "summary/epochs": 2,
        "summary/steps": 20,
        "summary/wall_seconds": 4.5,
    }
    assert recorder.status == "FINISHED"


@pytest.mark.parametrize("error, status", [(RuntimeError("NaN loss"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_an_exception_leaving_the_group_marks_the_run(error, status):
    recorder = Recorder()
    with pytest.raises(type(error)):
        with LoggerGroup([recorder]) as group:
            train(group, 1, 3)
            raise error
    assert recorder.status == status and len(recorder.batches[0]) == 3


class Broken(Recorder):
    def log_points(self, points):
        raise OSError(28, "No space left on device")


def test_a_logger_failing_mid_run_is_switched_off_and_the_others_go_on():
    recorder, broken = Recorder(), Broken()
    group = LoggerGroup([broken, recorder], flush_steps=5)
    with pytest.warns(RuntimeWarning) as caught:
        train(group, 1, 20)
        group.log_summary(SUMMARY)
        group.close()
    assert [str(w.message) for w in caught] == [
        (
            "Broken failed and is switched off for the rest of this run (OSError: [Errno 28] No space left on "
            "device); metrics.csv still gets every epoch"
        )
    ]
    assert broken.status is None and recorder.status == "FINISHED"
    assert sum(len(batch) for batch in recorder.batches) == 20 + 2 + 1  # steps, epoch rows, summary


# ---------------------------------------------------------------- TensorBoard


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    require("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_reader_finds_steps_epochs_summary_and_hparams(tmp_path):
    require("tensorboard")
    with build_loggers("csv,tensorboard", tmp_path, config=config(), resume=False, start_step=0) as group:
        train(group, 1, 20)
        group.log_summary(SUMMARY)
    found = scalars(tmp_path / "tensorboard")
    assert [s for s, _ in found["step/train_loss"]] == list(range(1, 21))
    assert [v for _, v in found["step/train_loss"]] == pytest.approx([loss_at(s) for s in range(1, 21)])
    assert found["step/lr"] == [(s, pytest.approx(0.05)) for s in range(1, 21)]
    assert found["epoch/epoch"] == [(10, 1.0), (20, 2.0)]
    assert found["epoch/train_loss"] == [(10, 1.0), (20, 0.5)]
    assert found["epoch/test_acc"] == [(20, pytest.approx(0.8))]  # epoch 1 had no evaluation
    assert found["summary/test_accuracy"] == [(20, pytest.approx(0.8))]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lr"].number_value == pytest.approx(0.05)
    assert hparams["model_args.width"].number_value == 32
    assert hparams["nesterov"].string_value == "True" and hparams["milestones"].string_value == "[3, 5]"


def test_tensorboard_after_a_resume_from_an_earlier_step_has_each_step_once(tmp_path):
    require("tensorboard")
    # The first run checkpoints at step 10 (end of epoch 1), logs steps 11-15 and is stopped.
    with build_loggers("tensorboard", tmp_path, config=config(), resume=False, start_step=0) as group:
        train(group, 1, 15)
    # The resume starts from that checkpoint: steps 11-15 again (other values, to tell them apart), then 16-20.
    with build_loggers("tensorboard", tmp_path, config=config(), resume=True, start_step=10) as group:
        train(group, 11, 20, offset=100.0)
        group.log_summary(SUMMARY)
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    found = scalars(tmp_path / "tensorboard")
    for tag in ("step/train_loss", "step/lr"):
        assert [s for s, _ in found[tag]] == list(range(1, 21)), tag
    expected = [loss_at(s) for s in range(1, 11)] + [loss_at(s, 100.0) for s in range(11, 21)]
    assert [v for _, v in found["step/train_loss"]] == pytest.approx(expected)  # the resumed run's values win
    assert [s for s, _ in found["epoch/train_loss"]] == [10, 20]
    assert found["summary/test_accuracy"] == [(20, pytest.approx(0.8))]


# ---------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One SQLite store for the module: creating its tables takes seconds."""
    require("mlflow"), require("sqlalchemy")
    return "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


def mlflow_run(run_dir, uri):
    from mlflow.tracking import MlflowClient

    record = json.loads((run_dir / "mlflow.json").read_text())
    client = MlflowClient(uri)
    return client, client.get_run(record["run_id"]), record


def history(client, run_id, key) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_mlflow_client_finds_the_run_its_config_and_its_metrics(tmp_path, mlflow_uri):
    run_dir = tmp_path / "convnet-run"
    run_dir.mkdir()
    with build_loggers(
        ["mlflow"], run_dir, config=config(), resume=False, start_step=0, mlflow_uri=mlflow_uri
    ) as group:
        train(group, 1, 20)
        group.log_summary(SUMMARY)
    client, run, record = mlflow_run(run_dir, mlflow_uri)
    assert record["tracking_uri"] == mlflow_uri
    assert run.info.status == "FINISHED" and run.info.run_name == "convnet-run"
    assert client.get_experiment(run.info.experiment_id).name == "cnnlab"
    assert run.data.tags["cnnlab.run_dir"] == str(run_dir.resolve())
    assert run.data.params == {k: str(v) for k, v in flat_params(config()).items()}
    assert run.data.params["model_args.width"] == "32" and run.data.params["lr"] == "0.05"
    steps = history(client, run.info.run_id, "step/train_loss")
    assert [s for s, _ in steps] == list(range(1, 21))
    assert [v for _, v in steps] == pytest.approx([loss_at(s) for s in range(1, 21)])
    assert history(client, run.info.run_id, "epoch/train_loss") == [(10, 1.0), (20, 0.5)]
    assert history(client, run.info.run_id, "epoch/test_acc") == [(20, pytest.approx(0.8))]
    assert run.data.metrics["summary/test_accuracy"] == pytest.approx(0.8)
    assert "summary/test_top5" not in run.data.metrics and "summary/device" not in run.data.metrics


def test_mlflow_resume_reattaches_the_run_without_duplicate_steps(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)  # the default store is MLflow's own choice
    with build_loggers("mlflow", tmp_path, config=config(), resume=False, start_step=0) as group:
        train(group, 1, 15)
    client, run, record = mlflow_run(tmp_path, mlflow_uri)
    assert record["tracking_uri"] == mlflow_uri and run.info.status == "KILLED"

    with build_loggers("mlflow", tmp_path, config=config(epochs=3), resume=True, start_step=10) as group:
        assert client.get_run(record["run_id"]).info.status == "RUNNING"
        train(group, 11, 20, offset=100.0)
        group.log_summary(SUMMARY)
    client, run, again = mlflow_run(tmp_path, mlflow_uri)
    assert again == record and run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id], f"tags.`cnnlab.run_dir` = '{tmp_path.resolve()}'")) == 1
    for key in ("step/train_loss", "step/lr"):
        assert [s for s, _ in history(client, run.info.run_id, key)] == list(range(1, 21)), key
    # MLflow keeps what it was sent: steps 11-15 keep the first run's values, the resumed run adds 16-20.
    expected = [loss_at(s) for s in range(1, 16)] + [loss_at(s, 100.0) for s in range(16, 21)]
    assert [v for _, v in history(client, run.info.run_id, "step/train_loss")] == pytest.approx(expected)
    assert [s for s, _ in history(client, run.info.run_id, "epoch/train_loss")] == [10, 20]
    # parameters cannot change in MLflow: the resumed value is a tag
    assert run.data.params["epochs"] == "2" and run.data.tags["resume.epochs"] == "3"


def test_a_resume_logs_only_where_its_own_settings_say(tmp_path, mlflow_uri, monkeypatch):
    """A run folder's mlflow.json may come from someone else: its URI (a path anywhere, a remote server) is
    used only where this run's settings name the same store; otherwise the resume stops with the fix."""
    require("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    with build_loggers("mlflow", tmp_path, config=config(), resume=False, start_step=0) as group:
        train(group, 1, 5)
    record = json.loads((tmp_path / "mlflow.json").read_text())
    for planted in ("https://tracking.example.invalid", f"sqlite:///{tmp_path / 'elsewhere' / 'x.db'}"):
        (tmp_path / "mlflow.json").write_text(json.dumps({**record, "tracking_uri": planted}))
        with pytest.raises(ConfigError) as info:
            build_loggers("mlflow", tmp_path, config=config(), resume=True, start_step=5)
        assert str(info.value) == (
            f"{tmp_path / 'mlflow.json'}: this run logged to MLflow at {planted}, but this "
            f"resume's tracking URI is {mlflow_uri}; to continue that MLflow run, set "
            f"MLFLOW_TRACKING_URI={planted} (only if you trust it), or delete mlflow.json to "
            "start a new one here"
        )
    assert not (tmp_path / "elsewhere").exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # MLflow's default store, in the working folder: not the record's
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlflow.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"this run logged to MLflow at .*, but this resume's tracking URI is "):
        build_loggers("mlflow", tmp_path, config=config(), resume=True, start_step=5)


def test_mlflow_file_store_is_refused_by_mlflow_3_unless_allowed(tmp_path, monkeypatch):
    mlflow = require("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(store))
    if hasattr(mlflow.environment_variables, "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
        with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE=true") as info:
            build_loggers("mlflow", tmp_path, config=config(), resume=False, start_step=0)
        assert str(info.value).startswith(f"MLflow tracking store {store.as_uri()}: ")
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    with build_loggers("mlflow", tmp_path, config=config(), resume=False, start_step=0) as group:
        train(group, 1, 10)
    client, run, record = mlflow_run(tmp_path, store.as_uri())
    assert record["tracking_uri"] == store.as_uri() and run.data.params["lr"] == "0.05"
    assert [s for s, _ in history(client, run.info.run_id, "step/lr")] == list(range(1, 11))


def test_tracking_uris_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_uri("file:mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_uri("file:///abs/mlruns") == "file:///abs/mlruns"
    assert absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_a_resume_whose_mlflow_run_is_gone_says_what_to_do(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    (tmp_path / "mlflow.json").write_text(
        json.dumps({"tracking_uri": mlflow_uri, "experiment_id": "1", "run_id": "0123456789abcdef0123456789abcdef"})
    )
    with pytest.raises(ConfigError) as info:
        build_loggers("mlflow", tmp_path, config=config(), resume=True, start_step=10)
    assert str(info.value) == (
        f"{tmp_path / 'mlflow.json'}: MLflow run 0123456789abcdef0123456789abcdef is not "
        f"in {mlflow_uri}; correct tracking_uri there, or delete the file to start a new "
        "MLflow run"
    )
    (tmp_path / "mlflow.json").write_text("{")
    with pytest.raises(ConfigError, match=r"mlflow.json: not the MLflow record cnnlab writes .*delete it"):
        build_loggers("mlflow", tmp_path, config=config(), resume=True, start_step=10)


# ---------------------------------------------------------------- through a real training run


def test_a_two_epoch_run_reaches_tensorboard_and_mlflow_through_the_cli(tmp_path, mlflow_uri):
    require("tensorboard")
    require("mlflow")
    import subprocess

    from conftest import write_image_folder
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = write_image_folder(tmp_path / "shapes")
    run = tmp_path / "run"
    env = {**os.environ, "CNNLAB_CACHE": str(tmp_path / "cache"), "MLFLOW_TRACKING_URI": mlflow_uri}
    result = subprocess.run(
        [
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
            "spec=c8,p,f16",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--run-dir",
            str(run),
            "--progress",
            "none",
            "--no-report",
            "--logger",
            "tensorboard,mlflow",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    steps = [e.step for e in accumulator.Scalars("step/train_loss")]
    assert steps == list(range(1, 15))  # 120 images in batches of 16: 7 steps an epoch
    assert [e.step for e in accumulator.Scalars("epoch/test_acc")] == [7, 14]
    assert "summary/test_accuracy" in accumulator.Tags()["scalars"]
    record = json.loads((run / "mlflow.json").read_text())
    client = MlflowClient(mlflow_uri)
    mlflow_run = client.get_run(record["run_id"])
    assert mlflow_run.data.params["model"] == "cnn" and mlflow_run.data.params["epochs"] == "2.0"
    assert [m.step for m in client.get_metric_history(record["run_id"], "step/lr")] == list(range(1, 15))
    summary = json.loads((run / "summary.json").read_text())
    assert mlflow_run.data.metrics["summary/test_accuracy"] == pytest.approx(summary["test_accuracy"])
