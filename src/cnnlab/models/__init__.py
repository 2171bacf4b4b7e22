"""Models: a registry of builders, one file per family."""

from . import airbench as _airbench  # noqa: F401
from . import alexnet as _alexnet  # noqa: F401
from . import cifar_resnet as _cifar_resnet  # noqa: F401
from . import convnet as _convnet  # noqa: F401  (registers the lecture's nets)
from . import lenet as _lenet  # noqa: F401
from . import resnet as _resnet  # noqa: F401
from .airbench import AIRBENCH94_RECIPE, Airbench, init_whitening
from .alexnet import AlexNet
from .cifar_resnet import CifarResNet
from .convnet import ConvNet, TraditionalCNN, parse_spec
from .lenet import LeNet5
from .registry import accepts, create_model, list_models, model_entrypoint, register_model
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "accepts",
    "create_model",
    "list_models",
    "model_entrypoint",
    "register_model",
    "ConvNet",
    "TraditionalCNN",
    "parse_spec",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "AlexNet",
    "LeNet5",
    "Airbench",
    "init_whitening",
    "AIRBENCH94_RECIPE",
]
