"""cnnlab: the lecture's convolutional networks, runnable and fast."""
from ._version import __version__
from .engine import Run, TrainConfig, fit, open_run, train
from .engine.trainer import lr_find
from .errors import CnnlabError
from .models import create_model, list_models

__all__ = ["__version__", "CnnlabError", "create_model", "list_models", "TrainConfig", "fit", "train", "open_run", "Run",
           "lr_find"]
