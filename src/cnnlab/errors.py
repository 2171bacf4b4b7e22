"""cnnlab's own error types: each message names the file or value at fault and the fix."""

__all__ = ["CnnlabError", "ConfigError", "DatasetError", "CheckpointError", "ModelError", "ImageError"]


class CnnlabError(Exception):
    """Base class: the command line prints these as one clear line instead of a traceback."""


class ConfigError(CnnlabError, ValueError):
    """A configuration key, type or value is wrong."""


class DatasetError(CnnlabError):
    """A dataset is missing, corrupt or malformed."""


class CheckpointError(CnnlabError):
    """A checkpoint or weights file is missing, corrupt or does not fit the model."""


class ModelError(CnnlabError, ValueError):
    """An unknown model name or invalid model arguments."""


class ImageError(CnnlabError):
    """An image file cannot be read or used."""
