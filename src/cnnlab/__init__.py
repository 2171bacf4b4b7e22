"""cnnlab: the lecture's convolutional networks, runnable and fast."""

from ._version import __version__
from .errors import CnnlabError
from .models import create_model, list_models
from .run import Run, open_run
from .training.config import TrainConfig
from .training.trainer import fit, lr_find, train

__all__ = [
    "__version__",
    "CnnlabError",
    "create_model",
    "list_models",
    "TrainConfig",
    "fit",
    "train",
    "open_run",
    "Run",
    "lr_find",
]
