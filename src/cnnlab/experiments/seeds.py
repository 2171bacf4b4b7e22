"""The seeds experiment: one recipe trained with several seeds, reported as mean, sample std and the share of runs
that reach a threshold (the way airbench states its 94% claim)."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import ConfigError
from ..run import Run
from .runner import ExperimentSpec, Member

__all__ = ["parse_seeds", "seeds_spec", "seed_statistics", "seeds_results"]


def parse_seeds(runs: int | None, seeds: str | None) -> list[int]:
    if runs is not None and seeds is not None:
        raise ConfigError("give either --runs N or --seeds 0,1,2, not both")
    if seeds is not None:
        try:
            out = [int(t) for t in seeds.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--seeds {seeds!r}: expected comma-separated integers such as 0,1,2") from None
        if len(set(out)) != len(out) or not out or min(out) < 0:
            raise ConfigError(f"--seeds {seeds!r}: expected distinct non-negative integers such as 0,1,2")
        return out
    runs = 5 if runs is None else runs
    if runs < 1:
        raise ConfigError(f"--runs {runs}: must be at least 1")
    return list(range(runs))


def seeds_spec(seeds: list[int], train_args: list[str], threshold: float | None) -> ExperimentSpec:
    members = [Member(f"seed{s}", [*train_args, "--seed", str(s)], {"seed": s}) for s in seeds]
    return ExperimentSpec("seeds", members, {"seeds": seeds, "threshold": threshold})


def seed_statistics(values: list[float], threshold: float | None = None) -> dict:
    """n, mean, sample standard deviation (n - 1; None for one run), min, max and, given a threshold, the count and
    fraction of values at or above it."""
    n = len(values)
    mean = sum(values) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 and mean is not None else None
    out = {
        "n": n,
        "mean": mean,
        "std": std,
        "min": min(values) if n else None,
        "max": max(values) if n else None,
        "threshold": threshold,
        "at_or_above": None,
        "fraction_at_or_above": None,
    }
    if threshold is not None and n:
        hits = sum(v >= threshold for v in values)
        out.update(at_or_above=hits, fraction_at_or_above=hits / n)
    return out


def seeds_results(folder: Path, spec: ExperimentSpec, record: dict) -> dict:
    runs = []
    for m in spec.members:
        run_dir = folder / m.name
        run = Run(run_dir)
        done = run.finished
        summary = run.summary if done else {}
        runs.append(
            {
                "name": m.name,
                "seed": m.info["seed"],
                "status": "finished" if done else "not finished",
                "test_accuracy": summary.get("test_accuracy"),
                "wall_seconds": summary.get("wall_seconds"),
                "train_seconds": summary.get("train_seconds"),
                "run_dir": m.name,
            }
        )
    finished = [r for r in runs if r["status"] == "finished"]
    threshold = spec.options.get("threshold")
    return {
        "experiment": "seeds",
        "folder": str(folder),
        "command": record.get("command"),
        "train_flags": spec.options.get("train_flags"),
        "runs": runs,
        "test_accuracy": seed_statistics([r["test_accuracy"] for r in finished], threshold),
        "wall_seconds": seed_statistics([r["wall_seconds"] for r in finished]),
        "note": "std is the sample standard deviation (n - 1); statistics over the finished runs only"
        + ("" if len(finished) == len(runs) else f" ({len(finished)} of {len(runs)})"),
    }
