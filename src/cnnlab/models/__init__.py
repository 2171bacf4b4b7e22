"""Models: a registry of builders, one file per family."""
from .registry import create_model, list_models, model_entrypoint, register_model
from . import convnet as _convnet  # noqa: F401  (registers the lecture's nets)
from .convnet import ConvNet, TraditionalCNN, parse_spec

__all__ = ["create_model", "list_models", "model_entrypoint", "register_model", "ConvNet", "TraditionalCNN",
           "parse_spec"]
