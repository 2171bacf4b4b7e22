"""One epoch of training steps: forward, loss, backward, the finiteness check, the update, and the step
boundary where signals, callbacks and `max_steps` are honoured, and where `fit` evaluates and checkpoints."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .progress import Progress
from .runtime import Runtime
from .state import EpochSums, TrainState

__all__ = ["StepRules", "RunState", "NonFiniteStep", "SignalStop", "EpochSteps", "accumulate"]


@dataclass
class RunState:
    """What callbacks see after each step; set `stop_requested` to stop at this step boundary."""

    run_dir: object
    model: nn.Module | None = None  # the model being trained (not a distributed wrapper)
    epoch: int = 0
    step: int = 0
    loss: float = float("nan")
    lr: float = float("nan")  # the learning rate of the step just taken (before any per-group lr_scale)
    stop_requested: bool = False


@dataclass(frozen=True)
class StepRules:
    """How steps are taken and when the epoch stops early."""

    total_steps: int
    grad_clip: float = 0.0
    on_nan: str = "stop"
    max_nan_skips: int = 10
    log_every: int = 100


class NonFiniteStep(Exception):
    """A step whose loss or gradients are NaN or infinite, beyond what the rules allow to skip."""

    def __init__(self, where: str, what: str, skipped: int):
        super().__init__(f"{where}: {what}")
        self.where, self.what, self.skipped = where, what, skipped


class SignalStop:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and the run exits 130/143."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def accumulate(sums: EpochSums, local: torch.Tensor, seconds: float, runtime: Runtime) -> None:
    """Fold this stretch's (loss sum, correct, seen) into the epoch's sums, over all ranks."""
    totals = runtime.all_reduce(local.clone()).tolist()
    sums.loss += totals[0]
    sums.correct += int(totals[1])
    sums.seen += int(totals[2])
    sums.seconds += seconds
    local.zero_()


def _grad_size(model: nn.Module, grad_clip: float) -> torch.Tensor:
    if grad_clip:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    # the L1 norms' sum is the cheapest quantity that is non-finite when any gradient is
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads, 1)).sum() if grads else torch.zeros(())


class EpochSteps:
    """One epoch of optimiser steps, handed out one at a time: iterating runs a step and yields its number at the
    step's boundary, so that the caller (`fit`) evaluates and checkpoints there itself, inline, then asks for the
    next. Iteration ends when the loader's epoch ends, `rules.total_steps` is reached, or a stop is requested;
    `stop` then says why it stopped early: a signal number, "callback", or None. A non-finite step that may not
    be skipped raises NonFiniteStep. `on_step(step, loss, lr)` gets the detached loss tensor (for loggers)."""

    def __init__(
        self,
        state: TrainState,
        step_model: nn.Module,
        loss_fn: Callable,
        lr_at: Callable[[int], float],
        runtime: Runtime,
        rules: StepRules,
        *,
        stopper: SignalStop,
        progress: Progress,
        callbacks: Sequence[Callable[[RunState], None]] = (),
        run_state: RunState | None = None,
        log: Callable[[str], None] = print,
        on_step: Callable[[int, torch.Tensor, float], None] | None = None,
    ):
        self.state, self.step_model, self.loss_fn, self.lr_at = state, step_model, loss_fn, lr_at
        self.runtime, self.rules, self.stopper, self.progress = runtime, rules, stopper, progress
        self.callbacks, self.run_state, self.log, self.on_step = callbacks, run_state, log, on_step
        self.stop: int | str | None = None
        # loss sum, correct, seen since the last fold into state.sums
        self.local = torch.zeros(3, dtype=torch.float64, device=runtime.device)
        self.tic = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        """Time spent in here (a mid-epoch evaluation) is not training time."""
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.tic += time.perf_counter() - paused

    def fold(self) -> None:
        """Fold the steps so far into the epoch's sums (over all ranks): before a checkpoint records them."""
        accumulate(self.state.sums, self.local, time.perf_counter() - self.tic, self.runtime)
        self.tic = time.perf_counter()

    def __iter__(self) -> Iterator[int]:
        state, runtime, rules, progress, local = self.state, self.runtime, self.rules, self.progress, self.local
        model, optimizer, loader = state.model, state.optimizer, state.loader
        device = runtime.device
        steps_per_epoch = len(loader)
        epoch = loader.epoch
        run_state, callbacks = self.run_state, self.callbacks

        def wanted():
            return self.stopper.signum or ("callback" if run_state is not None and run_state.stop_requested else None)

        requested = wanted()  # a stop this rank wants; in a distributed run all ranks agree on it at the next check
        for x, y in loader:
            lr = self.lr_at(state.step)
            for group in optimizer.param_groups:  # a group may train for the first epochs only (until_epoch)
                group["lr"] = lr * group.get("lr_scale", 1.0) * (epoch < group.get("until_epoch", float("inf")))
            with runtime.autocast():
                logits = self.step_model(x)
            loss = self.loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # One host sync per step covers the loss, every gradient and, across ranks, a requested stop.
            flags = torch.stack(
                [
                    (~torch.isfinite(loss.detach() + _grad_size(model, rules.grad_clip))).to(torch.float32),
                    torch.tensor(float(requested is not None), device=device),
                ]
            )
            bad, stop_agreed = (runtime.all_reduce(flags, "max") > 0).tolist()
            if bad:
                where = f"step {state.step + 1} (epoch {epoch + 1})"
                what = (
                    f"the loss is {loss.item()}"
                    if not torch.isfinite(loss)
                    else f"the loss is {loss.item():.4g} but a gradient is NaN or infinite"
                )
                if rules.on_nan == "skip" and state.nan_skipped < rules.max_nan_skips:
                    state.nan_skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                    self.log(
                        f"{where}: {what}; update skipped ({state.nan_skipped} of {rules.max_nan_skips} "
                        "allowed by --max-nan-skips)"
                    )
                else:
                    raise NonFiniteStep(where, what, state.nan_skipped)
            else:
                optimizer.step()
                for extra in state.extras.values():  # e.g. the lookahead of the weights
                    extra.after_step(state.step + 1, epoch)
                local += torch.stack(
                    [
                        loss.detach().double() * len(y),
                        (logits.detach().argmax(1) == y).sum().double(),
                        torch.tensor(float(len(y)), dtype=torch.float64, device=device),
                    ]
                )
            state.step += 1
            if self.on_step:
                self.on_step(state.step, loss.detach(), lr)
            if progress.wants(state.step) or callbacks:  # .item() waits for the GPU: only when someone looks
                loss_value = loss.item()
                if progress.wants(state.step):
                    seen = state.sums.seen + local[2].item() * runtime.world_size  # ranks see equal shares
                    elapsed = state.sums.seconds + time.perf_counter() - self.tic
                    progress.update(
                        state.step,
                        (state.sums.loss + local[0].item() * runtime.world_size) / max(seen, 1),
                        (state.sums.correct + local[1].item() * runtime.world_size) / max(seen, 1),
                        seen / max(elapsed, 1e-9),
                    )
                if callbacks and run_state is not None:
                    run_state.epoch, run_state.step, run_state.loss, run_state.lr = epoch, state.step, loss_value, lr
                    for callback in callbacks:
                        callback(run_state)
            if runtime.distributed:
                if stop_agreed:  # every rank saw the same flags: all stop at this boundary
                    self.stop = requested or wanted() or signal.SIGTERM
                    break
                requested = wanted()
            elif wanted() is not None:
                self.stop = wanted()
                break
            yield state.step  # the boundary: the caller evaluates and checkpoints here, before the next step
            if state.step >= rules.total_steps and loader.position < steps_per_epoch:
                break  # max_steps reached mid-epoch
        self.fold()
