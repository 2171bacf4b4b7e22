"""A run folder, and the one place that knows its layout: which file holds what, what "finished" means, and where
the run's data was. Training writes it (through `RunFolder`, rank 0 only); eval, predict, export, the report,
resume and the experiment runner read it through a `Run`.

    RUN_DIR/
      config.yaml              the resolved TrainConfig (data_dir as typed, data_dir_resolved beside it)
      last.ckpt, previous.ckpt checkpoints (checkpoint.py writes them through these names)
      metrics.csv, evals.csv   one row per epoch; mid-epoch evaluations (--eval-every-steps)
      model.safetensors        final weights, with model.json: the sidecar (model, classes, preprocessing)
      predictions.safetensors  each test image's loss and prediction from the final evaluation
      summary.json             written last: its presence with the weights means the run finished
      report.html, report/     the page (viz/report.py), its figures
      eval.json, confusion.png `cnnlab eval`'s output; viz/: `cnnlab viz`'s; explain.html: `cnnlab explain`'s
      mlflow.json, tensorboard/ the loggers' records
      lr_find.json, lr_find.png the learning-rate finder's curve (train --lr find, cnnlab lr-find RUN_DIR)
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import torch

from .errors import CheckpointError
from .training.config import TrainConfig, load_config

__all__ = ["Run", "open_run", "read_metrics", "is_run_folder", "RUN_FILES"]

RUN_FILES = {
    "config": "config.yaml",
    "checkpoint": "last.ckpt",
    "previous_checkpoint": "previous.ckpt",
    "damaged_checkpoint": "last.ckpt.damaged",
    "metrics": "metrics.csv",
    "evals": "evals.csv",
    "weights": "model.safetensors",
    "sidecar": "model.json",
    "predictions": "predictions.safetensors",
    "summary": "summary.json",
    "report": "report.html",
    "report_figures": "report",
    "eval": "eval.json",
    "confusion": "confusion.png",
    "viz": "viz",
    "mlflow": "mlflow.json",
    "tensorboard": "tensorboard",
    "lr_find": "lr_find.json",
    "lr_find_plot": "lr_find.png",
    "explain": "explain.html",
    "lock": ".lock",
    "launch_stamp": ".torchrun-launch",
}


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv as rows of floats (None where a value is empty)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def is_run_folder(path: str | Path) -> bool:
    return (Path(path) / RUN_FILES["config"]).is_file()


class Run:
    """A run folder read back: its files by role, its config, summary, metrics, trained model and data location.
    Every value is read on first use, so a `Run` of an unfinished run is cheap and says what is missing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def file(self, role: str) -> Path:
        """The path of one of RUN_FILES' roles in this run ('config', 'weights', 'summary', ...)."""
        return self.path / RUN_FILES[role]

    @property
    def finished(self) -> bool:
        """summary.json is written last, after the weights: both present means training ran to its end."""
        return self.file("summary").is_file() and self.file("weights").is_file()

    def require(self, *roles: str) -> None:
        for role in roles:
            if not self.file(role).is_file():
                raise CheckpointError(
                    f"{self.path}: no {RUN_FILES[role]}; give a folder that a finished 'cnnlab train' (or fit) wrote"
                    if role in ("config", "summary", "weights")
                    else f"{self.file(role)}: missing"
                )

    # ------------------------------------------------------------------ what the run recorded
    @functools.cached_property
    def config(self) -> TrainConfig:
        self.require("config")
        return load_config(self.file("config"))

    @functools.cached_property
    def summary(self) -> dict:
        return json.loads(self.file("summary").read_text()) if self.file("summary").is_file() else {}

    @functools.cached_property
    def metrics(self) -> list[dict]:
        """metrics.csv: one dict per epoch."""
        return read_metrics(self.file("metrics"))

    @property
    def data_mode(self) -> str:
        return self.summary.get("data_mode", "memory")

    def data_dir(self, override: str | None = None) -> str | None:
        """Where the run's data is: `override`, else the absolute folder recorded at training time (so a run trained
        with a relative --data-dir is found from any working folder), else the folder as typed."""
        if override:
            return override
        resolved, typed = self.config.data_dir_resolved, self.config.data_dir
        if resolved and Path(resolved).exists():
            return resolved
        return typed or resolved

    # ------------------------------------------------------------------ the trained model
    @functools.cached_property
    def weights(self):
        """model.safetensors with its sidecar: the model (on the CPU, in eval mode), classes, preprocessing."""
        from .inference.weights import load_weights

        return load_weights(self.path)

    @property
    def model(self) -> torch.nn.Module:
        return self.weights.model

    @property
    def classes(self) -> list[str]:
        return self.weights.classes

    def predictions(self) -> dict[str, torch.Tensor]:
        """Each test image's `losses`, `preds` and `labels` from the run's final evaluation, in the split's order."""
        from safetensors.torch import load_file

        path = self.file("predictions")
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing; it is written at the end of training (an unfinished run, or "
                "one made by an older cnnlab: score it again with 'cnnlab eval')"
            )
        return load_file(path)


def open_run(path: str | Path) -> Run:
    """A run folder that `fit` (or `cnnlab train`) finished."""
    run = Run(path)
    run.require("config", "summary")
    return run
