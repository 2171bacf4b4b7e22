"""cnnlab: the lecture's convolutional networks, runnable and fast."""
__version__ = "0.1.0"

from .errors import CnnlabError  # noqa: E402
from .models import create_model, list_models  # noqa: E402
from .engine import Run, TrainConfig, fit, open_run, train  # noqa: E402
from .engine.lr_find import lr_find  # noqa: E402

__all__ = ["__version__", "CnnlabError", "create_model", "list_models", "TrainConfig", "fit", "train", "open_run", "Run",
           "lr_find"]
