"""Progress display: a bar on a terminal, one plain line every N steps elsewhere, so CI logs stay small."""

from __future__ import annotations

import os
import sys
import time

__all__ = ["Progress", "trace"]


class Progress:
    def __init__(self, mode: str, total_steps: int, steps_per_epoch: int, log_every: int = 100, stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "plain"
        self.mode, self.total, self.steps_per_epoch, self.log_every = mode, total_steps, steps_per_epoch, log_every
        self._bar = None
        self._start = time.perf_counter()
        self._done_at_start: int | None = None

    def start_epoch(self, epoch: int, epochs: float, step: int) -> None:
        if self._done_at_start is None:
            self._done_at_start = step
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.steps_per_epoch,
                initial=step % self.steps_per_epoch,
                desc=f"epoch {epoch + 1}/{epochs:g}",
                unit="step",
                leave=True,
                file=self.stream,
                dynamic_ncols=True,
            )

    def wants(self, step: int) -> bool:
        """Whether `update` would show anything at this step (so the caller can skip reading the loss)."""
        return self.mode == "bar" or (self.mode == "plain" and step % self.log_every == 0)

    def update(self, step: int, loss: float, acc: float, img_per_s: float) -> None:
        if self.mode == "bar" and self._bar is not None:
            done = step - (self._done_at_start or 0)
            eta = (self.total - step) * (time.perf_counter() - self._start) / max(done, 1)
            self._bar.set_postfix_str(
                f"loss {loss:.3f} acc {acc:.3f} {img_per_s:,.0f} img/s ETA {eta:.0f}s", refresh=False
            )
            self._bar.update(1)
        elif self.mode == "plain" and step % self.log_every == 0:
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  acc {acc:.4f}  {img_per_s:,.0f} img/s",
                file=self.stream,
                flush=True,
            )

    def end_epoch(self, line: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.mode != "none":
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def trace(event: str) -> None:
    """With CNNLAB_TRACE=1, one line per phase change on stderr ("trace: checkpoint-write", ...).

    For debugging a hung or killed run, and for the tests that SIGKILL a run inside a given phase.
    """
    if os.environ.get("CNNLAB_TRACE"):
        print(f"trace: {event}", file=sys.stderr, flush=True)
