"""The degradation experiment of He et al. 2016 (Fig. 1 and Fig. 6): plain nets train worse as they get deeper,
ResNets of the same depths do not. One plain and one residual CIFAR net per depth, one recipe for all."""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import ConfigError
from ..run import Run
from .runner import ExperimentSpec, Member

__all__ = [
    "PAPER_TEST_ERROR",
    "PAPER_SOURCE",
    "DEFAULT_DEPTHS",
    "DEFAULT_TOLERANCE",
    "parse_depths",
    "degradation_spec",
    "read_member",
    "degradation_results",
    "verdict",
]

DEFAULT_DEPTHS = (20, 32, 44, 56)
# A gap in final training error within this many units (0.01 = one percentage point) counts as "no worse":
# the running training error of a CIFAR epoch moves by about that much between seeds.
DEFAULT_TOLERANCE = 0.01

# He et al. 2016, Table 6: CIFAR-10 test error (%) of the ResNets, full recipe (64k iterations, augmentation).
# ResNet-110: the best of 5 runs; their mean and std are 6.61 +- 0.16. Plain nets have no table entry.
PAPER_TEST_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
PAPER_SOURCE = (
    "He, Zhang, Ren, Sun 2016, 'Deep Residual Learning for Image Recognition', Table 6: CIFAR-10 test "
    "error in %, 64k iterations of the full recipe; ResNet-110 is the best of 5 runs (mean 6.61 +- "
    "0.16). The plain nets have no table entry: the paper shows them only as curves (Fig. 1 and Fig. 6, "
    "left: plain-56 ends above plain-20 in both training and test error)"
)


def parse_depths(text: str) -> list[int]:
    try:
        depths = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ConfigError(f"--depths {text!r}: expected comma-separated depths such as 20,32,44,56") from None
    bad = [d for d in depths if d < 8 or (d - 2) % 6]
    if bad:
        raise ConfigError(
            f"--depths: {', '.join(map(str, bad))} not of the form 6n+2 (8, 14, 20, 26, 32, ..., 56, 110)"
        )
    if len(depths) < 2:
        raise ConfigError(f"--depths {text!r}: give at least two depths to compare, e.g. 20,56")
    return depths


def degradation_spec(depths: list[int], train_args: list[str], tolerance: float = DEFAULT_TOLERANCE) -> ExperimentSpec:
    """Plain nets first, then ResNets, shallow to deep; every member gets the same `train_args`."""
    members = []
    for kind, model in (("plain", "cifar_plain"), ("residual", "cifar_resnet")):
        for depth in depths:
            name = f"{'plain' if kind == 'plain' else 'resnet'}{depth}"
            members.append(
                Member(
                    name,
                    ["--model", model, "--model-arg", f"depth={depth}", *train_args],
                    {"kind": kind, "depth": depth, "model": model},
                )
            )
    return ExperimentSpec("degradation", members, {"depths": depths, "tolerance": tolerance})


def _number(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def read_member(run_dir: Path) -> dict:
    """A run folder's result and its curves: error = 1 - accuracy, against iterations (epoch ends)."""
    out: dict = {"finished": False, "curves": None}
    run = Run(run_dir)
    metrics = run.file("metrics")
    rows: list[dict] = []
    if metrics.is_file():
        with metrics.open(newline="") as f:
            rows = list(csv.DictReader(f))
    if run.finished:
        summary = run.summary
        out.update(
            finished=True,
            test_accuracy=summary["test_accuracy"],
            test_error=1 - summary["test_accuracy"],
            train_seconds=summary["train_seconds"],
            wall_seconds=summary["wall_seconds"],
            steps=summary["steps"],
            epochs=summary["epochs"],
        )
        if rows:
            out["train_error"] = 1 - float(rows[-1]["train_acc"])
            per_epoch = summary["steps"] / max(summary["epochs"], 1)
            epochs = [float(r["epoch"]) for r in rows]
            out["curves"] = {
                "iterations": [round(e * per_epoch) for e in epochs],
                "train_error": [1 - float(r["train_acc"]) for r in rows],
                "test_error": [None if _number(r["test_acc"]) is None else 1 - float(r["test_acc"]) for r in rows],
            }
    out["epochs_done"] = len(rows)
    return out


def verdict(members: list[dict], tolerance: float) -> dict:
    """Degradation shows when the deepest plain net ends with a training error more than `tolerance` above the
    shallowest's; the ResNets avoid it when their deepest ends no more than `tolerance` above their shallowest."""

    def compare(kind: str) -> dict | None:
        done = sorted(
            (m for m in members if m["kind"] == kind and m.get("train_error") is not None), key=lambda m: m["depth"]
        )
        if len(done) < 2:
            return None
        shallow, deep = done[0], done[-1]
        gap = deep["train_error"] - shallow["train_error"]
        return {
            "shallowest": shallow["name"],
            "deepest": deep["name"],
            "shallowest_train_error": shallow["train_error"],
            "deepest_train_error": deep["train_error"],
            "difference": gap,
            "shallowest_test_error": shallow["test_error"],
            "deepest_test_error": deep["test_error"],
        }

    plain, residual = compare("plain"), compare("residual")
    out = {
        "criterion": "final training error (1 - the last epoch's training accuracy, as metrics.csv records it: "
        "measured on the augmented batches while training), deepest against shallowest net of "
        "each kind",
        "tolerance": tolerance,
        "plain": plain,
        "residual": residual,
    }
    if plain is None or residual is None:
        out.update(
            degradation_shown=None,
            residual_avoided_it=None,
            summary="incomplete: each kind needs its shallowest and deepest member finished",
        )
        return out
    plain["degradation"] = plain["difference"] > tolerance
    residual["degraded"] = residual["difference"] > tolerance
    out["degradation_shown"] = plain["degradation"]
    out["residual_avoided_it"] = not residual["degraded"]

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    def points(x: float) -> str:
        return f"{100 * x:+.1f} points"

    p, r = plain, residual
    first = (
        f"Degradation {'showed' if plain['degradation'] else 'did not show'}: {p['deepest']} ended at "
        f"{pct(p['deepest_train_error'])} training error against {p['shallowest']}'s "
        f"{pct(p['shallowest_train_error'])} ({points(p['difference'])}; tolerance {100 * tolerance:.1f} points)."
    )
    second = (
        f"The ResNets {'avoided it' if out['residual_avoided_it'] else 'degraded too'}: {r['deepest']} ended "
        f"at {pct(r['deepest_train_error'])} against {r['shallowest']}'s {pct(r['shallowest_train_error'])} "
        f"({points(r['difference'])})."
    )
    out["summary"] = f"{first} {second}"
    return out


def degradation_results(folder: Path, spec: ExperimentSpec, record: dict) -> dict:
    """results.json: per member its figures and curves, the paper's Table 6 beside them, and the verdict."""
    members = []
    for m in spec.members:
        depth, kind = m.info["depth"], m.info["kind"]
        found = read_member(folder / m.name)
        paper = PAPER_TEST_ERROR.get(depth) if kind == "residual" else None
        members.append(
            {
                "name": m.name,
                "model": m.info["model"],
                "model_args": {"depth": depth},
                "depth": depth,
                "kind": kind,
                "status": "finished"
                if found["finished"]
                else ("interrupted" if found["epochs_done"] else "not started"),
                "train_error": found.get("train_error"),
                "test_error": found.get("test_error"),
                "test_accuracy": found.get("test_accuracy"),
                "wall_seconds": found.get("wall_seconds"),
                "train_seconds": found.get("train_seconds"),
                "steps": found.get("steps"),
                "epochs": found.get("epochs"),
                "run_dir": m.name,
                "paper_test_error_percent": paper,
                "paper_note": None
                if paper is not None
                else (
                    "plain net: no table entry in the paper (Fig. 6 curves only)"
                    if kind == "plain"
                    else "no table entry for this depth"
                ),
                "curves": found["curves"],
            }
        )
    return {
        "experiment": "degradation",
        "folder": str(folder),
        "command": record.get("command"),
        "train_flags": spec.options.get("train_flags"),
        "depths": spec.options["depths"],
        "members": members,
        "paper": {
            "source": PAPER_SOURCE,
            "resnet_test_error_percent": {str(k): v for k, v in PAPER_TEST_ERROR.items()},
            "plain_test_error_percent": None,
        },
        "verdict": verdict(members, spec.options["tolerance"]),
        "wall_seconds_of_members": sum(m["wall_seconds"] or 0 for m in members),
    }
