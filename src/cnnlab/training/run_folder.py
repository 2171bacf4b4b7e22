"""The run folder: config, metrics, checkpoints, final weights, predictions and summary.

Only global rank 0 of a distributed run writes it (and holds its lock); every other rank writes nothing
anywhere, reads nothing from it, and gets what it needs (the folder's path, a checkpoint to resume
from) from rank 0 over the process group.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save as save_tensors

from ..errors import CheckpointError, ConfigError
from ..files import file_lock, save_atomic
from ..run import RUN_FILES, Run
from .checkpoint import CheckpointManager
from .runtime import Runtime
from .state import TrainState, rng_state, set_rng_state

__all__ = ["RunFolder", "default_run_dir"]


def default_run_dir(runs_root: str | Path, model: str, dataset: str) -> Path:
    """runs_root/<model>-<dataset>-<time>/, numbered when that exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(runs_root) / f"{model}-{dataset}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _elastic_index(runs_root: str | Path, run_id: str) -> Path:
    """Where rank 0 notes the default run folder of a torchrun launch, so that workers restarted after a
    failure (TORCHELASTIC_RESTART_COUNT > 0) find the run they were in."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)[:100]
    return Path(runs_root) / ".torchrun" / safe


class RunFolder:
    def __init__(self, path: Path, runtime: Runtime):
        self.path, self.runtime = Path(path), runtime
        self.checkpoints = CheckpointManager(self.path)
        self._made_here = False

    # ------------------------------------------------------------------------------------ opening
    @classmethod
    def choose(cls, run_dir: str | None, runs_root: str, model: str, dataset: str, runtime: Runtime) -> RunFolder:
        """`run_dir` (--run-dir), else a new runs_root/<model>-<dataset>-<time>/ chosen by rank 0 (the same one
        again after a torchrun restart)."""
        path = None
        if runtime.is_main:
            if run_dir:
                path = Path(run_dir)
            elif runtime.elastic_run_id:
                index = _elastic_index(runs_root, runtime.elastic_run_id)
                if runtime.restart_count > 0 and index.is_file():
                    path = Path(index.read_text().strip())
                else:
                    path = default_run_dir(runs_root, model, dataset)
                    index.parent.mkdir(parents=True, exist_ok=True)
                    save_atomic(str(path).encode(), index)
            else:
                path = default_run_dir(runs_root, model, dataset)
        return cls(Path(runtime.broadcast(str(path) if path else None)), runtime)

    def open(self, resume: bool | str, stack: contextlib.ExitStack, log: Callable[[str], None]) -> bool:
        """Refuse to overwrite a run, lock the folder and tidy it; returns whether to resume from a checkpoint.
        `resume="auto"` resumes when there is a checkpoint and starts otherwise; "restart" (workers restarted
        by torchrun) does so only in a folder this launch made (its TORCHELASTIC_RUN_ID stamped in it)."""
        decision = None
        if self.runtime.is_main:
            has_run = self.checkpoints.exists()
            stamp = Run(self.path).file("launch_stamp")
            if resume == "restart":  # workers restarted by torchrun continue only the folder their launch made
                same = stamp.is_file() and stamp.read_text().strip() == str(self.runtime.elastic_run_id)
                resume = "auto" if same else False
            if resume is False and has_run:
                raise ConfigError(
                    f"{self.path} already holds a run; resume it with 'cnnlab train --resume "
                    f"{self.path}' or choose another --run-dir"
                )
            self._made_here = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            stack.enter_context(self._lock())
            stack.callback(self._remove_if_left_empty)
            if resume:
                for stale in self.checkpoints.remove_stale_temp_files():
                    log(f"removed {stale.name}, left by a write that was cut short")
                if resume is True and not has_run:  # stopped before its first checkpoint: nothing to lose
                    log(f"{self.path} has no checkpoint yet; starting it from the beginning")
            decision = bool(resume) and has_run
            if self.runtime.elastic_run_id:
                save_atomic(str(self.runtime.elastic_run_id).encode(), stamp)
        return bool(self.runtime.broadcast(decision))

    @contextlib.contextmanager
    def _lock(self):
        """One process at a time per run folder: a second `--resume` of a live run would corrupt both."""
        try:
            with file_lock(Run(self.path).file("lock"), wait=False):
                yield
        except BlockingIOError:
            raise ConfigError(
                f"{self.path} is in use by another cnnlab process; wait for it to finish or stop it first"
            ) from None

    def _remove_if_left_empty(self) -> None:
        """A run that failed before it wrote anything leaves no folder behind (only its lock file)."""
        if (
            self._made_here
            and self.path.is_dir()
            and {p.name for p in self.path.iterdir()} <= {RUN_FILES["lock"], RUN_FILES["launch_stamp"]}
        ):
            shutil.rmtree(self.path, ignore_errors=True)

    # ------------------------------------------------------------------------------------ writing
    def write(self, role: str, data: bytes) -> None:
        """Rank 0 writes the file of `role` (a key of run.RUN_FILES), complete or absent."""
        if self.runtime.is_main:
            save_atomic(data, Run(self.path).file(role))

    def write_metrics(self, rows: list[dict]) -> None:
        if not rows:
            return
        fields = list(dict.fromkeys(k for row in rows for k in row))  # a partial last row may add none
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", restval="")
        writer.writeheader()
        writer.writerows(rows)
        self.write("metrics", buffer.getvalue().encode())

    def write_json(self, role: str, value: dict) -> None:
        self.write(role, json.dumps(value, indent=2).encode())

    def write_predictions(self, losses: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor) -> None:
        """Each test image's loss and prediction, so the report reads the run's own evaluation."""
        self.write(
            "predictions",
            save_tensors(
                {
                    "losses": losses.float().contiguous(),
                    "preds": preds.long().contiguous(),
                    "labels": labels.long().contiguous(),
                }
            ),
        )

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, state: TrainState, header: dict) -> None:
        """Every rank's generators are gathered (a collective: a rank whose peer died fails here and writes
        nothing), then rank 0 writes the checkpoint."""
        ranks = self.runtime.gather({"rng": rng_state(self.runtime.device), "loader": state.loader.state_dict()})
        if self.runtime.is_main:
            self.checkpoints.save(
                {
                    **header,
                    **state.state_dict(),
                    "rng": [r["rng"] for r in ranks],
                    "loaders": [r["loader"] for r in ranks],
                    "world_size": self.runtime.world_size,
                }
            )

    def load_checkpoint(self, log: Callable[[str], None]) -> dict:
        """Rank 0 reads and verifies the newest good checkpoint; every rank gets it."""
        state = self.checkpoints.load_latest(log=log) if self.runtime.is_main else None
        return self.runtime.broadcast(state)

    def restore(self, state: TrainState, saved: dict, log: Callable[[str], None]) -> None:
        """Load a checkpoint into `state`, and this rank's generators; at another world size, say that the
        continuation is not bitwise."""
        lacking = [
            k for k in ("model", "optimizer", "step", "history", "epoch_sums", "rng", "loader") if k not in saved
        ]
        if lacking:
            raise CheckpointError(
                f"{self.path}: the checkpoint lacks {', '.join(lacking)}; it was not written by "
                "this version of cnnlab's trainer. Start a new run"
            )
        rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
        rank = self.runtime.rank
        loaders = saved.get("loaders") or []
        if len(loaders) == self.runtime.world_size:  # each rank's own (a streamed split's bad images differ)
            saved = {**saved, "loader": loaders[rank]}
        try:
            state.load_state_dict(saved)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{self.path}: the checkpoint does not fit this run's model or optimiser "
                f"({type(exc).__name__}: {str(exc)[:160]}); resume with the run's own settings, or "
                "start a new run with --init-from"
            ) from None
        note = set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0], self.runtime.device)
        if note and self.runtime.is_main:
            log(f"note: {note}")
        if len(rngs) != self.runtime.world_size and self.runtime.is_main:
            log(
                f"note: the run was checkpointed by {len(rngs)} process(es) and resumes with "
                f"{self.runtime.world_size}: it continues from the same weights, optimiser state and data order, "
                "but not bit for bit"
            )
