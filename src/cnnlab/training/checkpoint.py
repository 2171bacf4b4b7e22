"""Checkpoints that are complete or absent, carry a checksum, and never execute code when loaded.

File layout: 8 magic bytes, the sha256 of the payload (32 bytes), then the payload as written by
`torch.save`. The payload holds only tensors, numbers, strings and plain containers, so it loads
with `weights_only=True`; there is no fallback to unrestricted unpickling.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import save_atomic
from ..run import Run
from .progress import trace

__all__ = ["read_checkpoint", "CheckpointManager", "save_atomic"]

MAGIC = b"CNNLABC1"


def _encode(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def read_checkpoint(path: Path) -> dict:
    """Load and verify one checkpoint file; raise CheckpointError saying what is wrong with it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if raw[:8] != MAGIC or len(raw) < 40:
        raise CheckpointError(f"{path}: not a cnnlab checkpoint (bad header, {len(raw)} bytes)")
    payload = raw[40:]
    if hashlib.sha256(payload).digest() != raw[8:40]:
        raise CheckpointError(f"{path}: checksum mismatch: the file is truncated or corrupt")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: refused to load: {str(exc).splitlines()[0]}") from None


class CheckpointManager:
    """Keeps `last.ckpt` and `previous.ckpt` in a run folder; the only good checkpoint is never overwritten."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        run = Run(self.run_dir)
        self.last, self.previous, self.damaged = (
            run.file("checkpoint"),
            run.file("previous_checkpoint"),
            run.file("damaged_checkpoint"),
        )
        self._last_is_good = False  # only a checkpoint we wrote or verified may be rotated into `previous`

    def exists(self) -> bool:
        return self.last.exists() or self.previous.exists()

    def save(self, state: dict) -> None:
        data = _encode(state)

        def rotate() -> None:  # the new file is complete and synced: the last good one becomes `previous`
            if self.last.exists() and self._last_is_good:
                os.replace(self.last, self.previous)

        try:
            save_atomic(
                data, self.last, before_replace=rotate, on_first_chunk=lambda tmp: trace(f"checkpoint-write {tmp}")
            )
        except OSError as exc:
            fix = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "make the folder writable"
            raise CheckpointError(
                f"cannot write a checkpoint in {self.run_dir} ({exc.strerror or exc}); the "
                f"last good checkpoint there is intact: {fix} and resume with "
                f"'cnnlab train --resume {self.run_dir}'"
            ) from None
        self._last_is_good = True

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the partial files of writes cut short by a kill: checkpoints, metrics, config. The caller
        holds the run folder's lock, so no live write is among them."""
        stale = sorted(self.run_dir.glob(".*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def load_latest(self, log=print) -> dict:
        """The newest checkpoint that verifies; a damaged `last` is reported and `previous` used instead."""
        errors = []
        for path in (self.last, self.previous):
            if not path.exists():
                continue
            try:
                state = read_checkpoint(path)
            except CheckpointError as exc:
                errors.append(str(exc))
                log(f"warning: {exc}; trying the previous checkpoint")
                continue
            if path == self.previous and self.last.exists():
                # keep the damaged file for inspection, out of the rotation
                os.replace(self.last, self.damaged)
                os.replace(self.previous, self.last)
            self._last_is_good = True
            return state
        if errors:
            raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
        raise CheckpointError(f"{self.run_dir}: no checkpoint to resume from (expected {self.last.name})")
