"""A finished run folder read back as one object, and `train`, which fits and returns it: what a notebook or a
script needs after `fit` (its metrics, summary, trained model, the test images it got most wrong)."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import CheckpointError
from .config import TrainConfig, config_from_dict, load_config
from .loop import RunState
from .run_folder import read_metrics
from .trainer import fit
from .weights import LoadedModel, load_weights

__all__ = ["Run", "open_run", "train", "highest_loss_images"]


@dataclass
class Run:
    """What `fit` wrote into a run folder: the resolved config, summary.json and metrics.csv (one dict per epoch);
    the trained model and its classes are loaded on first use."""
    path: Path
    config: TrainConfig
    summary: dict
    metrics: list[dict]

    @functools.cached_property
    def weights(self) -> LoadedModel:
        """model.safetensors with its sidecar: the model (on the CPU, in eval mode), classes, mean/std, input shape."""
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
        path = self.path / "predictions.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; it is written at the end of training (an unfinished run, or "
                                  "one made by an older cnnlab: score it again with 'cnnlab eval')")
        return load_file(path)


def open_run(path: str | Path) -> Run:
    """Read a run folder that `fit` (or `cnnlab train`) finished."""
    path = Path(path)
    for name in ("config.yaml", "summary.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: no {name}; give a folder that a finished 'cnnlab train' (or fit) wrote")
    return Run(path, load_config(path / "config.yaml"), json.loads((path / "summary.json").read_text()),
               read_metrics(path / "metrics.csv"))


def train(config: TrainConfig | None = None, *, callbacks: Sequence[Callable[[RunState], None]] = (),
          log: Callable[[str], None] = print, **fields) -> Run:
    """`fit` in one call, returning the finished run: `train(model="convnet", dataset="cifar10", epochs=4)`.
    Keywords are TrainConfig fields and override `config` (default: TrainConfig's defaults)."""
    cfg = config_from_dict(fields, base=config, source="train()")
    summary = fit(cfg, callbacks=callbacks, log=log)
    return open_run(summary["run_dir"])


def highest_loss_images(run: Run | str | Path, k: int = 16, data_dir: str | None = None) -> dict[str, torch.Tensor]:
    """The `k` test images the run's final model got most wrong: `indices` into the test split, `images` uint8
    (k, C, H, W) as the model saw them (before normalisation), `labels`, `preds` and `losses`, highest loss first.
    The test split is found as training found it (its config's data_dir, or `data_dir`)."""
    from .test_split import open_test_split
    from .runtime import Runtime

    run = run if isinstance(run, Run) else open_run(run)
    saved = run.predictions()
    meta = run.weights.meta
    split = open_test_split(run.config.dataset, data_dir or run.config.data_dir, input_shape=meta["input_shape"],
                            mean=meta["mean"], std=meta["std"], runtime=Runtime(torch.device("cpu")),
                            streamed=run.summary.get("data_mode") == "stream", workers=0, log=lambda m: None)
    if split.labels is None or not torch.equal(split.labels, saved["labels"]):
        raise CheckpointError(f"{run.path}: its predictions.safetensors does not match the test split of "
                              f"{run.config.dataset} found now (other files or another order); score the run again "
                              f"with 'cnnlab eval {run.path}'")
    losses, top = saved["losses"].topk(min(k, len(saved["losses"])))
    images = torch.stack([torch.from_numpy(split.image(i).copy()).permute(2, 0, 1) for i in top.tolist()])
    return {"indices": top, "images": images, "labels": saved["labels"][top], "preds": saved["preds"][top],
            "losses": losses}

