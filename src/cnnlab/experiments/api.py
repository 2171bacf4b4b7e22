"""Run an experiment, print its members' commands, or gather its results from the member folders."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..files import save_atomic
from .degradation import degradation_results
from .page import degradation_page, plot_error_curves, seeds_page
from .runner import ExperimentSpec, experiment_lock, load_spec, member_command, member_state, run_members, write_spec
from .seeds import seeds_results

__all__ = ["run_experiment", "gather", "member_commands", "default_folder"]


def default_folder(kind: str) -> Path:
    """experiments/<kind>-<time>/, numbered on if two start in the same second."""
    base = Path("experiments") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _figure_title(results: dict) -> str:
    v = results["verdict"]
    if v["plain"] is None or v["residual"] is None:
        return ""

    def gap(side: dict) -> str:
        return f"{side['deepest']} - {side['shallowest']}: {100 * side['difference']:+.1f} points"

    return f"final training error, deepest - shallowest: {gap(v['plain'])} (plain), {gap(v['residual'])} (ResNets)"


def gather(folder: str | Path, log: Callable[[str], None] = print) -> dict:
    """Write results.json and experiment.html (and the figure as PNG) from the member folders; trains nothing."""
    folder = Path(folder)
    spec, record = load_spec(folder)
    if spec.experiment == "degradation":
        results = degradation_results(folder, spec, record)
        figure = plot_error_curves(results["members"], title=_figure_title(results))
        save_atomic(figure, folder / "degradation.png")
        degradation_page(results, figure, folder / "experiment.html")
    else:
        results = seeds_results(folder, spec, record)
        seeds_page(results, folder / "experiment.html")
    save_atomic(json.dumps(results, indent=2).encode(), folder / "results.json")
    unfinished = [m.name for m in spec.members if member_state(folder / m.name) != "finished"]
    if unfinished:
        log(f"not finished yet: {', '.join(unfinished)} (results.json lists them without figures)")
    log(f"written: {folder / 'results.json'}, {folder / 'experiment.html'}")
    return results


def member_commands(
    folder: Path, spec: ExperimentSpec, devices: Sequence[str] = (), execution: Sequence[str] = ()
) -> list[str]:
    """One runnable `cnnlab train` line per member (a resume for a member already started)."""
    lines = []
    for i, member in enumerate(spec.members):
        flags = [*execution, *(["--device", devices[i % len(devices)]] if devices else [])]
        lines.append(shlex.join(member_command(folder.resolve(), member, flags)))
    return lines


def run_experiment(
    folder: Path,
    spec: ExperimentSpec,
    command: str,
    *,
    jobs: int = 1,
    devices: Sequence[str] = (),
    execution: Sequence[str] = (),
    print_commands: bool = False,
    log: Callable[[str], None] = print,
) -> dict | None:
    """Record the spec (or check it against the folder's), then train what is missing and gather the results;
    with `print_commands`, print the member commands and the gather command instead of training."""
    folder.mkdir(parents=True, exist_ok=True)
    with experiment_lock(folder):
        write_spec(folder, spec, command)
        if print_commands:
            for line in member_commands(folder, spec, devices, execution):
                print(line)
            gather_line = shlex.join([sys.executable, "-m", "cnnlab", "experiment", "gather", str(folder.resolve())])
            print(f"# when every member has finished: {gather_line}", file=sys.stderr)
            return None
        log(
            f"experiment folder {folder} ({len(spec.members)} members); to continue after an interruption, run "
            "the same command again"
        )
        start = time.monotonic()
        run_members(folder, spec, jobs=jobs, devices=devices, execution=execution, log=log)
        results = gather(folder, log=log)
        log(f"all {len(spec.members)} members finished; this runner took {time.monotonic() - start:,.0f} s")
        return results
