"""Weights that ship inside the package, trained by cnnlab itself: `cnnlab/weights/registry.json` lists each
file with its sha256, test accuracy and the exact command that made it.

A file is hashed and compared with the registry every time it is loaded, so a damaged install says so
instead of handing out wrong weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

from ..errors import CheckpointError

__all__ = [
    "PackagedWeights",
    "WEIGHTS_DIR",
    "list_packaged",
    "get_packaged",
    "find_packaged",
    "is_packaged",
    "packaged_names",
]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
_REGISTRY = "registry.json"


@dataclass(frozen=True)
class PackagedWeights:
    """One registry entry: `name` is `<model>-<dataset>`; `file` and `sidecar` lie in WEIGHTS_DIR."""

    name: str
    model: str
    dataset: str
    file: str
    sha256: str
    sidecar: str
    sidecar_sha256: str
    bytes: int
    test_accuracy: float  # on the dataset's full test split, with test-time augmentation level `tta`
    tta: int
    precision: str
    command: str  # exactly as it was run, seed included
    seed: int
    epochs: float
    train_seconds: float  # timed on a shared machine: indicative only
    cpu: str
    threads: int
    torch: str
    cnnlab: str
    trained: str  # UTC date
    record: dict = field(default_factory=dict, compare=False, repr=False)  # the whole entry, notes and data included

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file

    @property
    def sidecar_path(self) -> Path:
        return WEIGHTS_DIR / self.sidecar

    def verified_path(self) -> Path:
        """The weights file, after checking it and its sidecar byte for byte against the registry."""
        for path, want in ((self.path, self.sha256), (self.sidecar_path, self.sidecar_sha256)):
            try:
                got = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:
                raise CheckpointError(
                    f"{path}: packaged weights {self.name!r} cannot be read ({exc.strerror}); the "
                    "cnnlab install is incomplete: reinstall it (pip install --force-reinstall "
                    "cnnlab)"
                ) from None
            if got != want:
                raise CheckpointError(
                    f"{path}: sha256 {got[:12]}… but the registry of packaged weights expects "
                    f"{want[:12]}…; the cnnlab install is damaged: reinstall it (pip install "
                    "--force-reinstall cnnlab)"
                )
        return self.path


@lru_cache(maxsize=1)
def _read_registry(folder: Path) -> tuple[PackagedWeights, ...]:
    path = folder / _REGISTRY
    try:
        entries = json.loads(path.read_text())["weights"]
        names = {f.name for f in fields(PackagedWeights)} - {"record"}
        return tuple(PackagedWeights(**{k: v for k, v in e.items() if k in names}, record=e) for e in entries)
    except FileNotFoundError:
        return ()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: the registry of packaged weights is unreadable ({exc}); reinstall cnnlab"
        ) from None


def list_packaged() -> list[PackagedWeights]:
    """Every packaged weights entry, in registry order."""
    return list(_read_registry(WEIGHTS_DIR))


def packaged_names() -> list[str]:
    return [w.name for w in list_packaged()]


def is_packaged(name: str) -> bool:
    return any(w.name == name for w in list_packaged())


def get_packaged(name: str) -> PackagedWeights:
    """The entry called `name` (e.g. 'resnet20-cifar10')."""
    for entry in list_packaged():
        if entry.name == name:
            return entry
    raise CheckpointError(
        f"no packaged weights called {name!r}; packaged: {', '.join(packaged_names()) or 'none'} "
        "('cnnlab models --pretrained' lists them)"
    )


def find_packaged(model: str, tag: str) -> PackagedWeights:
    """`create_model(model, weights=tag)`: `tag` is the dataset ('cifar10') or the full name ('resnet20-cifar10')."""
    for entry in list_packaged():
        if entry.model == model and tag in (entry.dataset, entry.name):
            return entry
    own = [w.dataset for w in list_packaged() if w.model == model]
    offer = (
        f"packaged for {model!r}: {', '.join(own)}"
        if own
        else f"none are packaged for {model!r} (packaged: {', '.join(packaged_names()) or 'none'})"
    )
    raise CheckpointError(f"weights={tag!r}: no such file, and no packaged weights of that name; {offer}")
