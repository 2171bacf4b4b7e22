"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks", Sec. 3.3;
fastai's `lr_find`, Lightning's `Tuner.lr_find`): train for a short run while the learning rate rises
exponentially, watch the smoothed loss, stop when it diverges, suggest a learning rate, and put the model, the
optimiser, the data order and every generator back exactly as they were."""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..files import save_atomic
from .loop import EpochSteps, NonFiniteStep, RunState, SignalStop, StepRules
from .progress import Progress
from .runtime import Runtime
from .state import TrainState, rng_state, set_rng_state

__all__ = [
    "LRFinderResult",
    "search_lr",
    "suggest_lr",
    "smooth_losses",
    "plot_lr_find",
    "RULES",
    "DEFAULT_STEPS",
    "DEFAULT_START_LR",
    "DEFAULT_END_LR",
]

DEFAULT_STEPS = 100  # fastai's num_it and Lightning's num_training
DEFAULT_START_LR, DEFAULT_END_LR = 1e-6, 10.0
SMOOTHING = 0.98  # the exponential moving average of fastai and Lightning, debiased
DIVERGE_FACTOR = 4.0  # stop once the smoothed loss exceeds 4x its best so far (fastai)
# The default is steepest descent: on the test problem (tests/test_lr_find.py) the valley rule fell in the flat,
# noisy start of the curve (0.013, where a grid's best was 0.3-1.0) and trained 47 points worse; steepest descent
# (0.87) matched the grid's best.
RULES = {
    "steepest": "steepest-descent rule (Lightning): where the smoothed loss falls fastest against log(lr)",
    "valley": "valley rule (fastai): halfway along the longest stretch over which the smoothed loss keeps falling",
}


@dataclass
class LRFinderResult:
    """One range test: the learning rates tried, the raw and smoothed losses, and the suggestion."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    rule: str  # "valley" or "steepest": which one `suggestion` is
    valley: float | None
    steepest: float | None
    stopped_early: bool  # the loss diverged (or became non-finite) before the last step
    stop_reason: str
    start_lr: float
    end_lr: float
    steps: int  # planned
    files: dict = field(default_factory=dict)  # name -> path of what `save` wrote

    def describe(self) -> str:
        taken = f"{len(self.lrs)} of {self.steps} steps" + (f" ({self.stop_reason})" if self.stopped_early else "")
        other = "steepest" if self.rule == "valley" else "valley"
        other_lr = self.steepest if self.rule == "valley" else self.valley
        return (
            f"lr finder: {taken}, lr {self.start_lr:.3g} to {self.lrs[-1] if self.lrs else self.start_lr:.3g}; "
            f"suggested lr {self.suggestion:.3g} by the {RULES[self.rule]}"
            + (f"; the {other} rule gives {other_lr:.3g}" if other_lr else "")
        )

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict:
        """What summary.json records of a `--lr find` run."""
        return {
            "suggested": self.suggestion,
            "used": self.suggestion,
            "rule": self.rule,
            "rule_text": RULES[self.rule],
            "valley": self.valley,
            "steepest": self.steepest,
            "steps_taken": len(self.lrs),
            "steps": self.steps,
            "range": [self.start_lr, self.end_lr],
            "stopped_early": self.stopped_early,
            "stop_reason": self.stop_reason,
            "plot": Path(self.files["png"]).name if self.files else None,
        }

    def save(self, folder: str | Path) -> dict:
        """Write lr_find.json and lr_find.png into `folder`; returns {name: path}."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        from ..run import RUN_FILES  # a run folder's names; a plain folder gets the same ones

        self.files = {"json": str(folder / RUN_FILES["lr_find"]), "png": str(folder / RUN_FILES["lr_find_plot"])}
        plot_lr_find(self, Path(self.files["png"]))
        save_atomic(json.dumps(self.as_dict(), indent=1).encode(), Path(self.files["json"]))
        return self.files


# ---------------------------------------------------------------------------------------------- the rules


def smooth_losses(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased as in Adam so that the first values are not pulled towards 0."""
    average, out = 0.0, []
    for i, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**i))
    return out


def _trimmed(lrs: list[float], smoothed: list[float]) -> tuple[list[float], list[float]]:
    """The first 10% of the points (the average still settling) and the last 5 (the blow-up) are left out,
    as fastai does; short curves keep what they can."""
    begin, end = len(lrs) // 10, len(lrs) - 5
    if end - begin < 3:
        begin, end = 0, len(lrs)
    return lrs[begin:end], smoothed[begin:end]


def _valley(lrs: list[float], smoothed: list[float]) -> float | None:
    """fastai's `valley`: the longest decreasing run (subsequence) of the smoothed loss; halfway along it."""
    n = len(smoothed)
    if n < 2:
        return None
    lengths = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if smoothed[i] < smoothed[j] and lengths[i] < lengths[j] + 1:
                lengths[i] = lengths[j] + 1
        if lengths[end] < lengths[i]:
            end, start = i, i - lengths[i]
    sections = (end - start) / 3
    return lrs[min(start + int(sections) + int(sections / 2), n - 1)]


def _steepest(lrs: list[float], smoothed: list[float]) -> float | None:
    """The learning rate where d(smoothed loss)/d(log lr) is most negative."""
    if len(lrs) < 3:
        return None
    slopes = [
        (smoothed[i + 1] - smoothed[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
        for i in range(1, len(lrs) - 1)
    ]
    best = min(range(len(slopes)), key=slopes.__getitem__)
    return lrs[best + 1] if slopes[best] < 0 else None


def suggest_lr(lrs: list[float], smoothed: list[float], rule: str = "steepest") -> tuple[float | None, float | None]:
    """(valley, steepest) learning rates of a curve; either is None where the curve gives no answer."""
    if rule not in RULES:
        raise ConfigError(f"lr finder rule {rule!r} is unknown; choices: {', '.join(RULES)}")
    kept_lrs, kept = _trimmed(lrs, smoothed)
    return _valley(kept_lrs, kept), _steepest(kept_lrs, kept)


# ---------------------------------------------------------------------------------------------- the search


@contextlib.contextmanager
def _restored(model: nn.Module, optimizer: torch.optim.Optimizer, loader, device: torch.device):
    """Whatever happens inside, the model (weights and buffers, batch-norm statistics included), the optimiser
    (its state and every group's settings), the loader's position and the process's generators come back
    bit for bit."""
    saved = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(optimizer.state_dict()),
        copy.deepcopy(loader.state_dict()),
        rng_state(device),
        model.training,
    )
    try:
        yield
    finally:
        weights, optimiser_state, loader_state, generators, training = saved
        with torch.no_grad():
            model.load_state_dict(weights)
        optimizer.load_state_dict(optimiser_state)
        loader.load_state_dict(loader_state)
        set_rng_state(generators, device)
        model.train(training)


def search_lr(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader,
    *,
    runtime: Runtime | None = None,
    loss_fn: Callable | None = None,
    step_model: nn.Module | None = None,
    steps: int = DEFAULT_STEPS,
    start_lr: float = DEFAULT_START_LR,
    end_lr: float = DEFAULT_END_LR,
    rule: str = "steepest",
    diverge: float = DIVERGE_FACTOR,
    grad_clip: float = 0.0,
) -> LRFinderResult:
    """The range test on `model` with `optimizer` over batches of `loader` (an InMemoryLoader or a streaming
    loader), through the trainer's own steps (`EpochSteps`). Every parameter group's lr is the schedule's
    times its `lr_scale`, so groups with their own rates (airbench94) are scaled by one common factor; the lrs
    recorded are the schedule's. In a distributed run the losses are averaged over the ranks, so every rank
    sees the same curve and stops at the same step, and rank 0's suggestion is sent to all."""
    if not (0 < start_lr < end_lr) or steps < 5:
        raise ConfigError(
            f"lr finder: start lr {start_lr:g}, end lr {end_lr:g} and {steps} steps: it needs "
            "0 < start < end and at least 5 steps (e.g. --start-lr 1e-6 --end-lr 10 --steps 100)"
        )
    if len(loader) == 0:
        raise ConfigError("lr finder: the loader holds no full batch; lower --batch-size")
    runtime = runtime or Runtime(next(model.parameters()).device)
    loss_fn = loss_fn or nn.functional.cross_entropy
    ratio = end_lr / start_lr

    def lr_at(step: int) -> float:
        return start_lr * ratio ** (step / (steps - 1))

    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    why = ""

    def record(state: RunState) -> None:
        nonlocal why
        if state.stop_requested:  # a distributed run takes one more step before all ranks stop together
            return
        loss_sum = torch.tensor([state.loss], dtype=torch.float64, device=runtime.device)
        loss = runtime.all_reduce(loss_sum).item() / runtime.world_size
        lrs.append(state.lr)
        losses.append(loss)
        smoothed[:] = smooth_losses(losses)
        best = min(smoothed)
        if not math.isfinite(smoothed[-1]):
            why = f"the loss became {smoothed[-1]} at lr {state.lr:.3g}"
        elif smoothed[-1] > diverge * best:
            why = f"the smoothed loss {smoothed[-1]:.3g} passed {diverge:g}x its best {best:.3g} at lr {state.lr:.3g}"
        state.stop_requested = bool(why)

    search = TrainState(model, optimizer, loader)  # a scratch state: step 0, no lookahead, no sums kept
    rules = StepRules(total_steps=steps, grad_clip=grad_clip, on_nan="stop", log_every=steps + 1)
    with _restored(model, optimizer, loader, runtime.device):
        model.train()
        run_state = RunState(None, model=model)
        while search.step < steps and not why:
            try:
                for _ in EpochSteps(
                    search,
                    step_model or model,
                    loss_fn,
                    lr_at,
                    runtime,
                    rules,
                    stopper=SignalStop(),
                    progress=Progress("none", steps, len(loader)),
                    callbacks=[record],
                    run_state=run_state,
                    log=lambda m: None,
                ):
                    pass  # nothing to evaluate or checkpoint between the steps of a range test
            except NonFiniteStep as exc:  # a non-finite loss or gradient is divergence too
                why = f"{exc.what} at lr {lr_at(search.step):.3g}"
    valley, steepest = suggest_lr(lrs, smoothed, rule)
    chosen = valley if rule == "valley" else steepest
    if chosen is None:  # the other rule, where this one finds nothing (a curve without any fall: neither does)
        chosen, rule = (steepest, "steepest") if rule == "valley" else (valley, "valley")
    if chosen is None:
        raise ConfigError(
            f"lr finder: the loss did not fall anywhere between lr {start_lr:g} and "
            f"{lrs[-1] if lrs else start_lr:g} ({len(lrs)} steps{': ' + why if why else ''}); try a "
            "wider range (--start-lr, --end-lr) or more --steps"
        )
    result = LRFinderResult(
        lrs, losses, smoothed, float(chosen), rule, valley, steepest, bool(why), why, start_lr, end_lr, steps
    )
    result.suggestion = float(runtime.broadcast(result.suggestion))  # rank 0 decides
    return result


# ---------------------------------------------------------------------------------------------- the picture


def plot_lr_find(result: LRFinderResult, path: str | Path | None = None):
    """Smoothed loss against lr (log axis), the raw losses faint, the suggestion marked; returns the Figure."""
    from ..viz.figure import OKABE_ITO, finish, subplots

    fig, ax = subplots(figsize=(7, 4.2), layout="constrained")
    ax.plot(result.lrs, result.losses, color=OKABE_ITO["blue"], alpha=0.25, lw=0.8, label="loss per step")
    ax.plot(result.lrs, result.smoothed, color=OKABE_ITO["blue"], lw=2, label=f"smoothed (EMA {SMOOTHING})")
    marks = (
        ("valley", result.valley, OKABE_ITO["vermillion"]),
        ("steepest", result.steepest, OKABE_ITO["bluish green"]),
    )
    for name, lr, colour in marks:
        if lr is not None:
            chosen = " (suggested)" if name == result.rule else ""
            ax.axvline(lr, color=colour, ls="--" if chosen else ":", lw=1.5, label=f"{name}: {lr:.3g}{chosen}")
    finite = [s for s in result.smoothed if math.isfinite(s)]
    if finite:  # the blow-up at the end would flatten the interesting part
        low = min(finite + [v for v in result.losses if math.isfinite(v)])
        ax.set_ylim(low - 0.1 * abs(low), max(finite[0], low) * 1.5 + 0.05)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (the schedule's; groups scaled alike)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"LR range test: suggested {result.suggestion:.3g} ({result.rule})", fontsize=10)
    return finish(fig, path)
