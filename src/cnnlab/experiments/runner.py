"""One experiment = several ordinary `cnnlab train` runs in one folder, driven as subprocesses.

The folder holds `experiment.json` (what to train: the members and their flags), one run folder per member,
`logs/` and the results. Running the same command again continues where it stopped: finished members are kept,
an interrupted one resumes from its checkpoint (`cnnlab train --resume`), the others start.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._version import __version__
from ..errors import CnnlabError, ConfigError
from ..files import file_lock, save_atomic
from ..run import Run, is_run_folder

__all__ = [
    "Member",
    "ExperimentSpec",
    "member_state",
    "member_command",
    "write_spec",
    "load_spec",
    "run_members",
    "train_command",
    "SPEC_FILE",
    "ExperimentInterrupted",
    "ExperimentFailed",
]

SPEC_FILE = "experiment.json"
# Flags that say how a member runs, not what it computes: a rerun may change them, and they stay out of the spec.
EXECUTION_FLAGS = ("device", "threads", "progress", "log_every")


class ExperimentInterrupted(CnnlabError):
    """The runner was stopped (SIGINT/SIGTERM); the members checkpointed; the same command continues."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class ExperimentFailed(CnnlabError):
    """One or more members ended with an error; the others finished."""


@dataclass
class Member:
    """One training run of an experiment: its folder name and its `cnnlab train` flags (no --run-dir)."""

    name: str
    args: list[str]
    info: dict = field(default_factory=dict)  # what the results need: depth, kind, seed, ...


@dataclass
class ExperimentSpec:
    """What an experiment trains; two commands that produce equal specs drive the same folder."""

    experiment: str
    members: list[Member]
    options: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"experiment": self.experiment, "options": self.options, "members": [asdict(m) for m in self.members]}

    @classmethod
    def from_json(cls, data: dict) -> ExperimentSpec:
        return cls(data["experiment"], [Member(**m) for m in data["members"]], data.get("options", {}))


def train_command(*args: str) -> list[str]:
    """`cnnlab train ...` as this interpreter runs it, so a printed command works without the console script."""
    return [sys.executable, "-m", "cnnlab", "train", *args]


def member_state(run_dir: Path) -> str:
    """'finished' (summary and weights written), 'started' (config or a checkpoint present) or 'new'."""
    run = Run(run_dir)
    if run.finished:
        return "finished"
    if is_run_folder(run_dir) or run.file("checkpoint").is_file() or run.file("previous_checkpoint").is_file():
        return "started"
    return "new"


def member_command(folder: Path, member: Member, execution: Sequence[str] = ()) -> list[str]:
    run_dir = folder / member.name
    if member_state(run_dir) != "new":  # the run's own config.yaml says the rest (finished: nothing left to train)
        return train_command("--resume", str(run_dir), *execution)
    return train_command("--run-dir", str(run_dir), *member.args, *execution)


def _flag_pairs(args: list[str]) -> list[str]:
    """'--epochs 2' as one item, so that a difference reads as flags and values."""
    out: list[str] = []
    for token in args:
        if out and out[-1].startswith("--") and " " not in out[-1] and not token.startswith("--"):
            out[-1] += f" {token}"
        else:
            out.append(token)
    return out


def _spec_differences(old: ExperimentSpec, new: ExperimentSpec) -> list[str]:
    out = []
    if old.experiment != new.experiment:
        out.append(f"experiment {old.experiment!r} here, {new.experiment!r} asked for")
    for key in dict.fromkeys([*old.options, *new.options]):
        if key != "train_flags" and old.options.get(key) != new.options.get(key):  # flags: compared per member
            out.append(f"{key} {old.options.get(key)} here, {new.options.get(key)} asked for")
    old_members, new_members = {m.name: m.args for m in old.members}, {m.name: m.args for m in new.members}
    if list(old_members) != list(new_members):
        out.append(f"members {', '.join(old_members)} here, {', '.join(new_members)} asked for")
    for name in old_members:
        if name in new_members and old_members[name] != new_members[name]:
            old_flags, new_flags = _flag_pairs(old_members[name]), _flag_pairs(new_members[name])
            gone = [f for f in old_flags if f not in new_flags] or ["(none)"]
            added = [f for f in new_flags if f not in old_flags] or ["(none)"]
            out.append(f"{name}'s flags here have {', '.join(gone)} where this command gives {', '.join(added)}")
            break  # the flags usually differ for every member alike: one example says it
    return out


def load_spec(folder: Path) -> tuple[ExperimentSpec, dict]:
    """The spec recorded in `folder`, and the whole record (with the command that made it)."""
    path = folder / SPEC_FILE
    try:
        record = json.loads(path.read_text())
        return ExperimentSpec.from_json(record), record
    except FileNotFoundError:
        raise ConfigError(
            f"{folder}: not an experiment folder (no {SPEC_FILE}); give the folder that "
            "'cnnlab experiment' made (its --out)"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a valid experiment record ({exc})") from None


def write_spec(folder: Path, spec: ExperimentSpec, command: str) -> None:
    """Record `spec` in `folder`, or check it against the one already there; a different one is refused."""
    path = folder / SPEC_FILE
    if path.exists():
        old, record = load_spec(folder)
        differences = _spec_differences(old, spec)
        if differences:
            raise ConfigError(
                f"{folder} holds a different experiment: {'; '.join(differences)}. It was made by: "
                f"{record.get('command', '?')}. Repeat that command to continue it, or choose "
                "another --out for the new one"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        **spec.to_json(),
        "command": command,
        "cnnlab_version": __version__,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    save_atomic(json.dumps(record, indent=2).encode(), path)


@contextlib.contextmanager
def experiment_lock(folder: Path):
    """One runner per experiment folder; a second one is refused at once."""
    try:
        with file_lock(folder / ".lock", wait=False):
            yield
    except BlockingIOError:
        raise ConfigError(
            f"{folder} is being run by another 'cnnlab experiment' process; wait for it to finish or stop it first"
        ) from None


def _wait_for_run_folder(run_dir: Path, log: Callable[[str], None], timeout: float = 120.0) -> None:
    """A member of a killed runner may still be writing its last checkpoint: wait until it lets go of its folder."""
    lock = Run(run_dir).file("lock")
    if not lock.exists():
        return
    deadline, said = time.monotonic() + timeout, False
    while True:
        try:
            with file_lock(lock, wait=False):
                return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"{run_dir} is still in use by another cnnlab process after {timeout:.0f} s; "
                    "stop that process (it may be a member left running by an earlier runner) "
                    "and run the command again"
                ) from None
            if not said:
                log(
                    f"waiting for the process still holding {run_dir} (a member of an earlier runner, saving "
                    "its checkpoint?)"
                )
                said = True
            time.sleep(0.5)


def _die_with_parent() -> None:
    """Linux: a member gets SIGTERM when its runner dies, even by SIGKILL, so it checkpoints and stops instead
    of training on unwatched (and holding its folder against the rerun)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def run_members(
    folder: Path,
    spec: ExperimentSpec,
    *,
    jobs: int = 1,
    devices: Sequence[str] = (),
    execution: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Train every member not finished yet, `jobs` at a time; returns each member's state afterwards.

    Member i runs on devices[i % len(devices)] (no more than ceil(jobs / len(devices)) at once on one device).
    """
    jobs = max(1, jobs)
    per_device = -(-jobs // len(devices)) if devices else jobs
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    states = {m.name: member_state(folder / m.name) for m in spec.members}
    pending = [(i, m) for i, m in enumerate(spec.members) if states[m.name] != "finished"]
    kept = [m.name for m in spec.members if states[m.name] == "finished"]
    if kept:
        log(f"kept {len(kept)} finished member(s): {', '.join(kept)}")
    running: dict[str, tuple[subprocess.Popen, str, float]] = {}  # name -> (process, device, start time)
    failed: list[str] = []
    total = len(spec.members)

    def launch(index: int, member: Member) -> None:
        device = devices[index % len(devices)] if devices else ""
        flags = [*execution, *(["--device", device] if device else [])]
        run_dir = folder / member.name
        _wait_for_run_folder(run_dir, log)
        command = member_command(folder, member, flags)
        how = "resuming from its checkpoint" if "--resume" in command else "starting"
        log_path = folder / "logs" / f"{member.name}.log"
        with open(log_path, "a") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
            out.flush()
            # A session of its own: Ctrl-C reaches the runner only, which then stops each member with one
            # SIGTERM (a second signal would stop a member without its checkpoint).
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        running[member.name] = (process, device, time.monotonic())
        where = f" on {device}" if device else ""
        log(f"[{index + 1}/{total}] {member.name}: {how}{where} (log: {log_path})")

    def reap(name: str, code: int) -> None:
        _, _, start = running.pop(name)
        run_dir = folder / name
        states[name] = member_state(run_dir)
        log_path = folder / "logs" / f"{name}.log"
        if code == 0 and states[name] == "finished":
            summary = Run(run_dir).summary
            log(f"{name}: finished, test accuracy {summary['test_accuracy']:.4f}, {time.monotonic() - start:.0f} s")
        else:
            failed.append(name)
            log(f"{name}: failed (exit code {code}); the end of {log_path}:\n{_log_tail(log_path)}")

    stop: list[int] = []

    def on_signal(signum, frame):
        stop.append(signum)

    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    try:
        while (pending or running) and not stop:
            for index, member in list(pending):
                if len(running) >= jobs:
                    break
                device = devices[index % len(devices)] if devices else ""
                if sum(d == device for _, d, _ in running.values()) >= per_device:
                    continue
                pending.remove((index, member))
                launch(index, member)
            for name, (process, _, _) in list(running.items()):
                code = process.poll()
                if code is not None:
                    reap(name, code)
            time.sleep(0.2)
    finally:  # stopped by a signal or an error: the members checkpoint on SIGTERM, then exit
        for process, _, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process, _, _ in running.values():
            process.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop:
        raise ExperimentInterrupted(
            f"stopped; the members checkpointed. Run the same command again to continue {folder}", 128 + stop[0]
        )
    if failed:
        raise ExperimentFailed(
            f"{len(failed)} member(s) failed: {', '.join(failed)} (logs in {folder / 'logs'}); "
            "run the same command again to retry them from their checkpoints"
        )
    return states
