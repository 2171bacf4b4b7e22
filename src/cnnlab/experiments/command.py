"""`cnnlab experiment`: its flags and the experiment built from them (the CLI only dispatches here)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError

__all__ = ["add_experiment_parser", "experiment_command"]


_EXPERIMENT_EPILOG = """Every member is an ordinary run folder under --out (default experiments/<kind>-<time>/),
trained by 'cnnlab train' in a subprocess (its output in --out/logs/). Run the same command again after an
interruption: finished members are kept, an interrupted one resumes from its checkpoint, the others start; a
command asking for something else in the same folder is refused. --jobs N trains N members at once (member i on
device i mod the --devices list; on CPU each gets --threads cores/N). --print-commands prints one 'cnnlab train'
line per member instead of training (stdout) and the gather command (stderr); for a Slurm job array:
  cnnlab experiment degradation --out exp ... --print-commands > members.txt
  sbatch --array=1-$(wc -l < members.txt) --wrap 'eval "$(sed -n ${SLURM_ARRAY_TASK_ID}p members.txt)"'
  cnnlab experiment gather exp      # afterwards: results.json and experiment.html from the member folders
A member stopped on the cluster continues with 'cnnlab train --resume exp/MEMBER', or by running the experiment
command itself. Train flags (below) pass through to every member; a chosen recipe replaces the defaults shown."""


def experiment_command(args) -> int:
    """`cnnlab experiment degradation|seeds|gather ...`: build the experiment from the flags and run it."""
    from dataclasses import fields

    from ..training.config import TrainConfig
    from . import ExperimentInterrupted, default_folder, gather, run_experiment
    from .flags import check_devices, default_threads, member_train_args

    if args.kind == "gather":
        results = gather(args.folder)
        members = results.get("members") or results.get("runs")
        assert members is not None  # gather's results list them
        return 0 if all(m["status"] == "finished" for m in members) else 1
    from . import degradation_spec, parse_depths, parse_seeds, seeds_spec

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    devices = check_devices(args.devices)
    if devices and "device" in values:
        raise ConfigError("give either --device (every member) or --devices (member i on device i mod the list)")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: must be at least 1")
    refused = {"run_dir": "each member gets its own folder under --out"}
    if args.kind == "degradation":
        refused.update(
            model="the degradation experiment trains cifar_plain and cifar_resnet at each of --depths",
            model_args="the degradation experiment sets depth itself; give --depths",
        )
        depths = parse_depths(args.depths)
        train_args, given, execution = member_train_args(
            values, args.recipe, refused, models=("cifar_plain", "cifar_resnet")
        )
        spec = degradation_spec(depths, train_args, args.tolerance)
        options = f"--depths {','.join(map(str, depths))} --recipe {args.recipe} --tolerance {args.tolerance}"
    else:
        refused["seed"] = "give the seeds with --seeds 0,1,2 or --runs N"
        seeds = parse_seeds(args.runs, args.seeds)
        train_args, given, execution = member_train_args(values, args.recipe, refused)
        spec = seeds_spec(seeds, train_args, args.threshold)
        options = (
            f"--seeds {','.join(map(str, seeds))}"
            + (f" --recipe {args.recipe}" if args.recipe else "")
            + (f" --threshold {args.threshold}" if args.threshold is not None else "")
        )
    spec.options["train_flags"] = train_args
    if args.jobs > 1 and not devices and "threads" not in values:
        execution += ["--threads", str(default_threads(args.jobs))]
    import shlex

    folder = Path(args.out) if args.out else default_folder(args.kind)
    command = f"cnnlab experiment {args.kind} {options} --out {shlex.quote(str(folder))} {shlex.join(given)}"
    try:
        run_experiment(
            folder,
            spec,
            command.strip(),
            jobs=args.jobs,
            devices=devices,
            execution=execution,
            print_commands=args.print_commands,
        )
    except ExperimentInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    return 0


def add_experiment_parser(sub) -> None:
    """The `experiment` subcommand's parser, each kind with every train flag passed through to its members."""
    from ..training.config import add_config_flags
    from ..training.recipes import RECIPES

    p = sub.add_parser(
        "experiment",
        help="several training runs as one experiment: degradation, seeds, gather",
        description="Experiments over ordinary 'cnnlab train' runs.",
    )
    kinds = p.add_subparsers(dest="kind", required=True)
    for kind, help_text in (
        (
            "degradation",
            "He et al. 2016's degradation experiment: plain nets and ResNets at several depths, "
            "one recipe; results.json with a verdict, experiment.html with the Fig. 6 curves",
        ),
        ("seeds", "one recipe with several seeds: mean, sample std and the share of runs at or above --threshold"),
    ):
        k = kinds.add_parser(
            kind,
            help=help_text,
            description=help_text,
            epilog=_EXPERIMENT_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if kind == "degradation":
            k.add_argument("--depths", default="20,32,44,56", help="depths of the form 6n+2 (default: 20,32,44,56)")
            k.add_argument(
                "--recipe",
                default="he2016_warmup",
                choices=("he2016_warmup", "he2016", "none"),
                help="he2016_warmup (default): He et al. 2016's recipe, every member warmed up from 0.01 "
                "rising linearly to 0.1 over the first epoch; --epochs N scales it",
            )
            k.add_argument(
                "--tolerance",
                type=float,
                default=0.01,
                help="training-error gap (fraction) within which a deeper net counts as no worse "
                "(default: 0.01, one percentage point)",
            )
        else:
            k.add_argument("--runs", type=int, help="seeds 0..N-1 (default: 5)")
            k.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
            k.add_argument(
                "--recipe", choices=tuple(RECIPES), help="a published recipe for every run (e.g. airbench94 or fast)"
            )
            k.add_argument(
                "--threshold",
                type=float,
                help="test accuracy (fraction, e.g. 0.94) whose share of runs at or above it is reported",
            )
        k.add_argument("--out", metavar="DIR", help="experiment folder (default: experiments/<kind>-<time>/)")
        k.add_argument("--jobs", type=int, default=1, help="members trained at once (default: 1)")
        k.add_argument("--devices", metavar="LIST", help="e.g. cuda:0,cuda:1: member i runs on device i mod the list")
        k.add_argument(
            "--print-commands",
            action="store_true",
            help="print one 'cnnlab train' line per member and the gather command; train nothing",
        )
        add_config_flags(k)
        k.add_argument(
            "--no-report", dest="report", action="store_const", const="false", help="members write no report.html"
        )
    g = kinds.add_parser(
        "gather",
        help="write results.json and experiment.html from the member folders (no "
        "training); exit code 1 while members are unfinished",
    )
    g.add_argument("folder", metavar="DIR")
