"""`cnnlab train`'s companions on the command line: several training processes on this machine through torchrun
(`--nproc-per-node N`), and `cnnlab lr-find`."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import ConfigError

__all__ = ["hand_over_to_torchrun", "lr_find_command", "add_lr_find_parser", "train_config"]


def hand_over_to_torchrun(args, train_config) -> int:
    """`cnnlab train --nproc-per-node N ...` is `torchrun --standalone --nproc-per-node N -m cnnlab train ...`,
    with the run folder chosen here so that workers restarted after a failure find it."""
    from torch.distributed.run import main as torchrun

    from .run_folder import default_run_dir

    argv = list(args.argv)
    drop = {"--nproc-per-node", "--max-restarts"}
    rest, i = [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in drop:
            i += 1 if "=" in argv[i] else 2
            continue
        rest.append(argv[i])
        i += 1
    if not args.resume and not args.run_dir:
        cfg = train_config(args)
        rest += ["--run-dir", str(default_run_dir(cfg.runs_root, cfg.model, cfg.dataset))]
    launcher = [
        "--standalone",
        f"--nproc-per-node={args.nproc_per_node}",
        f"--max-restarts={args.max_restarts}",
        "-m",
        "cnnlab",
        *rest,
    ]
    print(f"torchrun {' '.join(launcher)}", file=sys.stderr)
    try:
        torchrun(launcher)
    except Exception as exc:  # torchrun's ChildFailedError lists each failed rank and its exit code
        if hasattr(exc, "sigval"):  # the agent itself was signalled: the workers checkpointed and stopped
            return 128 + int(exc.sigval)
        failures = getattr(exc, "failures", {})
        codes = sorted({f.exitcode for f in failures.values()}) if failures else [1]
        print(
            f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            file=sys.stderr,
        )
        return next((c for c in codes if c in (130, 143)), 1)
    return 0


def train_config(args):
    """defaults, then the recipe, then the YAML file, then flags; then the recipe's rules (recipes.build_config)."""
    from .config import flag_values
    from .recipes import build_config

    return build_config(args.recipe, args.config, flag_values(args), log=lambda m: print(m, file=sys.stderr))


def lr_find_command(args) -> int:
    """`cnnlab lr-find [RUN_DIR] [train flags]`: the range test for the run those flags (or RUN_DIR's config)
    describe; lr_find.png and lr_find.json go into RUN_DIR (its report shows them) or --out."""
    from ..run import Run, is_run_folder
    from .config import config_from_args
    from .trainer import lr_find

    if args.run:
        if not is_run_folder(args.run):
            raise ConfigError(
                f"{args.run}: not a run folder (no config.yaml); give a folder 'cnnlab train' made, or "
                "leave it out and give the training flags"
            )
        if args.config or args.recipe:
            raise ConfigError("lr-find RUN_DIR takes the run's own config.yaml; leave out --config and --recipe")
        cfg, out = config_from_args(args, Run(args.run).config), Path(args.out or args.run)
    else:
        cfg, out = train_config(args), Path(args.out or "lr-find")
    result = lr_find(
        cfg,
        steps=args.steps,
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        rule=args.rule,
        out=out,
        log=lambda m: print(m, file=sys.stderr),
    )
    from .runtime import distributed_env

    if distributed_env()["rank"] == 0:
        print(
            f"suggested lr: {result.suggestion:.3g} ({result.rule}); train with it: cnnlab train --lr "
            f"{result.suggestion:.3g} ... (or --lr find); curve: {result.files.get('png', out)}"
        )
    return 0


def add_lr_find_parser(sub) -> None:
    """`cnnlab lr-find [RUN_DIR] [train flags]`."""
    from .config import add_config_flags
    from .lr_find import DEFAULT_END_LR, DEFAULT_START_LR, DEFAULT_STEPS, RULES
    from .recipes import RECIPES

    p = sub.add_parser(
        "lr-find",
        help="the learning-rate range test: loss against an exponentially rising lr, "
        "and a suggestion (train with it: --lr find)",
        description="Trains the run's model for a short run (default 100 steps) while the learning "
        "rate rises exponentially, stops when the smoothed loss passes 4x its best, and "
        "suggests a learning rate (Smith 2017; fastai's lr_find). Rules: "
        + "; ".join(f"{k}: {v}" for k, v in RULES.items())
        + ". Nothing is trained "
        "for real: the run's setup is only measured.",
    )
    p.add_argument(
        "run",
        nargs="?",
        metavar="RUN_DIR",
        help="a run folder: its config, and where lr_find.png goes (its report then shows the curve)",
    )
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"steps at most (default {DEFAULT_STEPS})")
    p.add_argument("--start-lr", type=float, default=DEFAULT_START_LR, help=f"default {DEFAULT_START_LR:g}")
    p.add_argument("--end-lr", type=float, default=DEFAULT_END_LR, help=f"default {DEFAULT_END_LR:g}")
    p.add_argument("--rule", choices=tuple(RULES), default="steepest", help="which rule suggests (default: steepest)")
    p.add_argument(
        "--out", metavar="DIR", help="where lr_find.png and lr_find.json go (default: RUN_DIR, or ./lr-find)"
    )
    p.add_argument("--config", help="YAML file of config keys (flags override it)")
    p.add_argument("--recipe", choices=tuple(RECIPES), help="a published recipe's optimiser and settings")
    add_config_flags(p)
