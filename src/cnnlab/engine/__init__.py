"""Training engine: config, runtime (device, precision, processes), fit and its loop, the scorer, checkpoints."""
from .config import TrainConfig, config_from_dict, load_config
from .evaluate import evaluate, most_confused
from .loop import RunState
from .run import Run, open_run
from .test_split import highest_loss_images
from .trainer import TrainingError, TrainingInterrupted, fit, resume_config, train
from .weights import load_weights, save_weights

__all__ = ["TrainConfig", "config_from_dict", "load_config", "evaluate", "most_confused", "RunState",
           "TrainingError", "TrainingInterrupted", "fit", "resume_config", "load_weights", "save_weights",
           "Run", "open_run", "train", "highest_loss_images"]
