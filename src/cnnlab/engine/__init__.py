"""The former engine package, kept so that code written against it still imports: training moved to
`cnnlab.training`, inference to `cnnlab.inference`, the run folder to `cnnlab.run`. `cnnlab.engine.NAME` and
`cnnlab.engine.MODULE` resolve to their new homes."""

import importlib
import sys

_MOVED = {
    **{
        m: f"cnnlab.training.{m}"
        for m in (
            "config",
            "recipes",
            "optim",
            "lookahead",
            "state",
            "runtime",
            "loggers",
            "progress",
            "trainer",
            "loop",
            "training_data",
            "run_folder",
            "checkpoint",
            "lr_find",
            "launch",
        )
    },
    **{m: f"cnnlab.inference.{m}" for m in ("weights", "evaluate", "tta", "predict", "export", "test_split")},
    "run": "cnnlab.run",
}
for _old, _new in _MOVED.items():  # `import cnnlab.engine.weights` finds the module where it lives now
    sys.modules[f"{__name__}.{_old}"] = importlib.import_module(_new)

from cnnlab.inference.evaluate import evaluate, most_confused  # noqa: E402
from cnnlab.inference.test_split import highest_loss_images  # noqa: E402
from cnnlab.inference.weights import load_weights, save_weights  # noqa: E402
from cnnlab.run import Run, open_run  # noqa: E402
from cnnlab.training.config import TrainConfig, config_from_dict, load_config  # noqa: E402
from cnnlab.training.loop import RunState  # noqa: E402
from cnnlab.training.trainer import TrainingError, TrainingInterrupted, fit, resume_config, train  # noqa: E402

__all__ = [
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "evaluate",
    "most_confused",
    "RunState",
    "TrainingError",
    "TrainingInterrupted",
    "fit",
    "resume_config",
    "load_weights",
    "save_weights",
    "Run",
    "open_run",
    "train",
    "highest_loss_images",
]
