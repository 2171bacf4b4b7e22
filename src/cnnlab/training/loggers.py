"""Experiment loggers: TensorBoard and MLflow beside the run folder's metrics.csv, which the trainer writes itself.

The trainer drives one LoggerGroup: per optimiser step (train loss, learning rate), per epoch (a metrics.csv row),
the config as hyperparameters and summary.json's numbers at the end. Step points wait in a list and reach the
loggers at most every `flush_secs` seconds, every `flush_steps` steps and at each epoch end, so a step costs an
append, and a loss handed over as a tensor is read back from the GPU once per batch of points, not once per step.

Step numbers count optimiser steps done: the first step is logged as 1, and a run resumed from a checkpoint taken
after `start_step` steps logs `start_step + 1` next. Epoch rows and the summary are logged at the step they end on.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote

import torch

from ..errors import ConfigError
from ..files import save_atomic

__all__ = [
    "LOGGER_NAMES",
    "parse_loggers",
    "check_loggers",
    "build_loggers",
    "LoggerGroup",
    "TensorBoardLogger",
    "MlflowLogger",
    "flat_params",
]

# csv is the run folder's metrics.csv, written by the trainer: accepted so that '--logger csv,tensorboard' reads
# naturally, and nothing to build here.
LOGGER_NAMES = ("csv", "tensorboard", "mlflow")
# Modules each logger imports, and the extra that installs them. MLflow 3 keeps runs in SQLite by default
# (sqlite:///mlflow.db), which needs SQLAlchemy and Alembic; mlflow-skinny does not bring them.
_REQUIRES = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow"),
}
# Tags (TensorBoard) and metric keys (MLflow): 'step/train_loss', 'epoch/<metrics.csv column>', 'summary/<key>'.
# Every name has a group: MLflow's file store keeps a metric per file, so 'epoch' would clash with 'epoch/lr'.
STEP, EPOCH, SUMMARY = "step/", "epoch/", "summary/"
# The TensorBoard hparams dashboard shows these beside the config; log_summary logs their values.
_HPARAM_METRICS = (SUMMARY + "test_accuracy", SUMMARY + "test_loss")

Point = tuple[int, float, dict]  # (step, wall-clock seconds since the epoch, {name: value})


def parse_loggers(names: str | Sequence[str]) -> list[str]:
    """'tensorboard,mlflow' or ['csv', 'mlflow'] -> known names in order, without repeats."""
    parts = names.split(",") if isinstance(names, str) else [p for name in names for p in str(name).split(",")]
    chosen: list[str] = []
    for part in parts:
        name = part.strip().lower()
        if not name:
            continue
        if name not in LOGGER_NAMES:
            raise ConfigError(
                f"unknown logger {part.strip()!r}; choose from {', '.join(LOGGER_NAMES)} "
                "(several comma-separated, e.g. 'tensorboard,mlflow')"
            )
        if name not in chosen:
            chosen.append(name)
    return chosen


def check_loggers(names: str | Sequence[str]) -> list[str]:
    """Refuse an unknown logger or one whose package is missing (ConfigError), before any work starts;
    returns the parsed names."""
    chosen = parse_loggers(names)
    for name in chosen:
        modules, extra = _REQUIRES.get(name, ((), ""))
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigError(
                    f"logger '{name}' needs the {module} package, which cannot be imported ({exc}); "
                    f"install it with: pip install 'cnnlab[{extra}]'"
                ) from None
    return chosen


def build_loggers(
    names: str | Sequence[str],
    run_dir: str | Path,
    *,
    config: Mapping[str, Any] | Any,
    resume: bool,
    start_step: int,
    mlflow_uri: str | None = None,
    flush_secs: float = 10.0,
    flush_steps: int = 1000,
) -> LoggerGroup:
    """The loggers named (csv is implicit), writing for `run_dir`; `config` (a dict or TrainConfig) is logged
    as hyperparameters. With resume=True they continue the earlier run after `start_step` steps."""
    run_dir = Path(run_dir)
    params = flat_params(config)
    loggers: list = []
    try:
        for name in check_loggers(names):
            if name == "tensorboard":
                loggers.append(TensorBoardLogger(run_dir / "tensorboard", params, resume=resume, start_step=start_step))
            elif name == "mlflow":
                loggers.append(MlflowLogger(run_dir, params, resume=resume, tracking_uri=mlflow_uri))
    except BaseException:
        for logger in loggers:
            logger.close("FAILED")
        raise
    return LoggerGroup(loggers, start_step=start_step, flush_secs=flush_secs, flush_steps=flush_steps)


def flat_params(config: Mapping[str, Any] | Any) -> dict[str, str | int | float | bool]:
    """A config as one flat dict of scalars: nested dicts become 'model_args.width', lists and None strings."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    flat: dict[str, str | int | float | bool] = {}

    def visit(mapping: Mapping, prefix: str) -> None:
        for key, value in mapping.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                visit(value, name + ".")
            elif isinstance(value, (bool, int, float, str)):
                flat[name] = value
            elif value is None:
                flat[name] = "None"
            else:  # lists, empty dicts: JSON reads like the YAML config
                flat[name] = json.dumps(value, default=str)

    visit(cast(Mapping, config), "")  # a dataclass became a dict above
    return flat


class LoggerGroup:
    """What the trainer calls: fans every call out to each logger. Also a context manager that closes them,
    marking the run FAILED when an exception leaves the block."""

    def __init__(
        self, loggers: Iterable = (), *, start_step: int = 0, flush_secs: float = 10.0, flush_steps: int = 1000
    ):
        self.loggers = list(loggers)
        self.flush_secs, self.flush_steps = flush_secs, flush_steps
        self.last_step = start_step
        self._pending: list[Point] = []
        self._next_handover = time.monotonic() + flush_secs
        self._summary_logged = False

    def log_step(self, step: int, values: Mapping[str, float | torch.Tensor]) -> None:
        """Every optimiser step: e.g. {'train_loss': loss.detach(), 'lr': 0.05}; tensors are read later, in bulk."""
        if not self.loggers:
            return
        self._pending.append(
            (step, time.time(), {STEP + k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in values.items()})
        )
        self.last_step = step
        if len(self._pending) >= self.flush_steps or time.monotonic() >= self._next_handover:
            self._hand_over()

    def log_epoch(self, epoch: int, step: int, row: Mapping[str, Any]) -> None:
        """One metrics.csv row at the end of an epoch; empty cells (no evaluation this epoch) are left out."""
        if not self.loggers:
            return
        values = {EPOCH + "epoch": epoch}
        values.update({EPOCH + k: v for k, v in row.items() if _is_number(v)})
        self._pending.append((step, time.time(), values))
        self.last_step = max(self.last_step, step)
        self.flush()

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """summary.json's top-level numbers (test accuracy and loss, seconds, steps ...) at the run's last step."""
        self._summary_logged = True
        if not self.loggers:
            return
        step = summary.get("steps")
        step = step if isinstance(step, int) and not isinstance(step, bool) else self.last_step
        self._pending.append((step, time.time(), {SUMMARY + k: v for k, v in summary.items() if _is_number(v)}))
        self.flush()

    def flush(self) -> None:
        """Hand the waiting points to the loggers and have them write their files (each epoch end; the trainer
        may also call it before a checkpoint, so that a killed run loses no point it will not log again)."""
        self._hand_over()
        self._each("flush")

    def close(self, status: str | None = None) -> None:
        """Flush and close every logger. MLflow records `status`; by default FINISHED once the summary was logged,
        else KILLED (stopped early: a resume continues the same run)."""
        self._hand_over()
        self._each("close", status or ("FINISHED" if self._summary_logged else "KILLED"))
        self.loggers = []

    def __enter__(self) -> LoggerGroup:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A resumable stop (Ctrl-C, SIGTERM: the trainer's TrainingInterrupted carries an exit_code) is KILLED,
        # anything else that escapes is FAILED.
        if exc is None:
            self.close()
        else:
            self.close("KILLED" if isinstance(exc, KeyboardInterrupt) or hasattr(exc, "exit_code") else "FAILED")

    def _hand_over(self) -> None:
        self._next_handover = time.monotonic() + self.flush_secs
        if not self._pending:
            return
        points, self._pending = self._pending, []
        _read_tensors(points)
        self._each("log_points", points)

    def _each(self, method: str, *args) -> None:
        # Hours of training are worth more than a dashboard: a logger that fails mid-run (a full disk, a tracking
        # server gone) is reported and switched off, and the run goes on with metrics.csv and the other loggers.
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as exc:
                self.loggers.remove(logger)
                warnings.warn(
                    f"{type(logger).__name__} failed and is switched off for the rest of this run "
                    f"({type(exc).__name__}: {exc}); metrics.csv still gets every epoch",
                    RuntimeWarning,
                    stacklevel=3,
                )


class TensorBoardLogger:
    """Scalars in event files under RUN_DIR/tensorboard/ through torch.utils.tensorboard.SummaryWriter."""

    def __init__(self, log_dir: str | Path, params: Mapping[str, Any], *, resume: bool, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.log_dir = Path(log_dir)
        first = not any(self.log_dir.glob("events.out.tfevents.*"))
        # The new file starts with a purge mark: TensorBoard drops what this folder holds from that step on (the
        # steps a killed run logged after its last checkpoint, which the resumed run logs again). A fresh run
        # purges from 0, so a reused folder shows only the new run.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1 if resume else 0, flush_secs=30)
        if first:  # TensorBoard keeps the first hparams record it reads for a run: writing them again is moot
            # (hparams() would show booleans as 0/1: strings read better)
            values = {k: str(v) if isinstance(v, bool) else v for k, v in params.items()}
            assert self.writer.file_writer is not None  # SummaryWriter opens it on creation
            for proto in hparams(values, dict.fromkeys(_HPARAM_METRICS, 0.0)):  # experiment, session start, end
                self.writer.file_writer.add_summary(proto)

    def log_points(self, points: Sequence[Point]) -> None:
        for step, wall_time, values in points:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step, walltime=wall_time)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class MlflowLogger:
    """One MLflow run per run folder (its id in RUN_DIR/mlflow.json), in MLflow's tracking store: `tracking_uri`,
    else $MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db in the working folder)."""

    def __init__(
        self, run_dir: str | Path, params: Mapping[str, Any], *, resume: bool, tracking_uri: str | None = None
    ):
        import mlflow
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._Metric = Metric
        run_dir = Path(run_dir)
        self.record = run_dir / "mlflow.json"
        saved = _read_record(self.record) if resume and self.record.exists() else None
        # Only where this run's own settings say: a run folder is a file someone may have handed us, and its
        # record's URI could name any path for an SQLite file, or a remote server.
        self.tracking_uri = absolute_uri(tracking_uri or mlflow.get_tracking_uri())
        if saved and saved["tracking_uri"] != self.tracking_uri:
            theirs = saved["tracking_uri"][:300].encode("unicode_escape").decode()
            raise ConfigError(
                f"{self.record}: this run logged to MLflow at {theirs}, but this resume's tracking URI "
                f"is {self.tracking_uri}; to continue that MLflow run, set MLFLOW_TRACKING_URI={theirs} "
                f"(only if you trust it), or delete {self.record.name} to start a new one here"
            )
        params = {k: str(v) for k, v in params.items()}
        try:
            self.client = MlflowClient(self.tracking_uri)
            if saved:
                run = self._reopen(saved["run_id"])
                self.run_id = saved["run_id"]
                # MLflow refuses to change a parameter: values changed on resume go into tags instead.
                old = run.data.params
                tags = [RunTag(f"resume.{k}", v) for k, v in params.items() if k in old and old[k] != v]
                new = [Param(k, v) for k, v in params.items() if k not in old]
                self.client.log_batch(self.run_id, params=new, tags=tags)
                self.client.update_run(self.run_id, status="RUNNING")
                # MLflow keeps every point it is sent, so a step logged twice would show twice: skip what the
                # store already has (the steps a killed run logged after its last checkpoint).
                self.logged_up_to = {
                    key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                    for key in run.data.metrics
                }
            else:
                experiment_id = self._experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "cnnlab")
                run = self.client.create_run(
                    experiment_id, run_name=run_dir.name, tags={"cnnlab.run_dir": str(run_dir.resolve())}
                )
                self.run_id = run.info.run_id
                save_atomic(
                    json.dumps(
                        {"tracking_uri": self.tracking_uri, "experiment_id": experiment_id, "run_id": self.run_id},
                        indent=2,
                    ).encode(),
                    self.record,
                )
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
                self.logged_up_to = {}
        except MlflowException as exc:
            raise ConfigError(f"MLflow tracking store {self.tracking_uri}: {exc.message}") from None

    def _reopen(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException:
            raise ConfigError(
                f"{self.record}: MLflow run {run_id} is not in {self.tracking_uri}; correct "
                "tracking_uri there, or delete the file to start a new MLflow run"
            ) from None

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another run created it meanwhile
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def log_points(self, points: Sequence[Point]) -> None:
        metrics = [
            self._Metric(name, value, int(wall_time * 1000), step)
            for step, wall_time, values in points
            for name, value in values.items()
            if step > self.logged_up_to.get(name, -1)
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def flush(self) -> None:
        pass  # log_batch has written each batch of points already

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def absolute_uri(uri: str) -> str:
    """A tracking URI that names the same store from any working folder (SQLite files and plain folders)."""
    if uri.startswith("sqlite:///"):
        path = unquote(uri[len("sqlite:///") :])
        return "sqlite:///" + os.path.abspath(path) if path and path != ":memory:" else uri
    if uri.startswith("file:"):
        path = unquote(uri[len("file:") :])
        return uri if path.startswith("//") else Path(path).resolve().as_uri()
    if "://" not in uri:  # a plain folder, as MLflow takes it
        return Path(uri).resolve().as_uri()
    return uri


def _read_record(path: Path) -> dict:
    try:
        if path.stat().st_size > 1 << 20:  # cnnlab writes about 150 bytes
            raise ValueError("too large")
        record = json.loads(path.read_text())
        if isinstance(record, dict) and isinstance(record.get("tracking_uri"), str) and record.get("run_id"):
            return record
    except (OSError, ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        pass
    raise ConfigError(
        f"{path}: not the MLflow record cnnlab writes ({{'tracking_uri': ..., 'run_id': ...}}); "
        "delete it to start a new MLflow run"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_tensors(points: list[Point]) -> None:
    """Replace tensor values by floats in place: one stack and one copy to the host per device."""
    slots: dict[torch.device, list] = {}
    for _, _, values in points:
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                slots.setdefault(value.device, []).append((values, name))
    for where in slots.values():
        floats = torch.stack([values[name].float().reshape(()) for values, name in where]).tolist()
        for (values, name), number in zip(where, floats):
            values[name] = number
