"""The command line: argparse subcommands, each a thin call into the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._version import __version__
from .errors import CnnlabError, ConfigError

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
        if value < 0:
            raise ValueError
        return value
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number, 0 or more") from None


class _Parser(argparse.ArgumentParser):
    """argparse, but an unknown flag names the nearest known ones of the same command, in one line, and a prefix
    of a flag is not taken for it (`--epoch` is not `--epochs`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        """One line on stderr, not the whole usage: what is wrong and where the full list is."""
        command = self.prog.removeprefix("cnnlab").strip()
        self.exit(
            2,
            f"cnnlab{' ' + command if command else ''}: error: {message} ('cnnlab "
            f"{command + ' ' if command else ''}--help' lists the options)\n",
        )

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        unknown = [a.split("=", 1)[0] for a in extras if a.startswith("-")]
        if unknown and self.prog == "cnnlab":
            import difflib

            command = getattr(namespace, "command", None)
            sub = self._subparsers._group_actions[0].choices.get(command) if command and self._subparsers else None
            options = [o for a in (sub or self)._actions for o in a.option_strings if o.startswith("--")]
            hints = []
            for flag in unknown:
                close = difflib.get_close_matches(flag, options, n=3, cutoff=0.6)
                hints.append(f"{flag} (did you mean {' or '.join(close)}?)" if close else flag)
            (sub or self).error(f"unknown option(s): {', '.join(hints)}")
        return namespace, extras


def _lazy(module: str, function: str):
    """A subcommand's function, imported when it runs (so that `cnnlab --help` stays fast)."""

    def run(args) -> int:
        import importlib

        return getattr(importlib.import_module(f"cnnlab.{module}"), function)(args)

    return run


def _input_size(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
        if min(c, h, w) < 1:
            raise ValueError
        return c, h, w
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected C,H,W such as 3,32,32") from None


def _model_args(items: list[str] | None) -> dict:
    from .training.config import _flag_value

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-arg {item!r}: expected KEY=VALUE")
        out[key] = _flag_value(value)
    return out


def _train_config(args):
    from .training.launch import train_config

    return train_config(args)


def _resume_target(args):
    """(run folder to resume, resume mode) from --resume RUN_DIR or --resume auto (with --run-dir)."""
    if args.resume == "auto":
        if not args.run_dir:
            raise ConfigError(
                "--resume auto needs --run-dir DIR: the run to continue if it has a checkpoint, "
                "or to start if it has none"
            )
        return Path(args.run_dir), "auto"
    return Path(args.resume), True


def cmd_train(args, fit_options: dict | None = None) -> int:
    from .run import Run, is_run_folder
    from .training.config import TrainConfig, config_from_args
    from .training.trainer import fit, resume_config

    if args.nproc_per_node:
        from .training.launch import hand_over_to_torchrun

        return hand_over_to_torchrun(args, _train_config)
    if args.resume:
        run_dir, mode = _resume_target(args)
        if args.config or args.recipe:
            raise ConfigError("--resume takes the run's own config.yaml; leave out --config and --recipe")
        if mode == "auto" and not is_run_folder(run_dir):
            cfg = _train_config(args)  # nothing to continue yet: start it
        else:
            changed = [
                k
                for k, v in vars(args).items()
                if v is not None and k in TrainConfig.__dataclass_fields__ and k != "run_dir"
            ]
            overrides = config_from_args(args, Run(run_dir).config) if is_run_folder(run_dir) else None
            cfg = resume_config(run_dir, overrides, changed)
        summary = fit(cfg, resume=mode, **(fit_options or {}))
    else:
        cfg = _train_config(args)
        summary = fit(cfg, **(fit_options or {}))
    from .training.runtime import distributed_env

    if distributed_env()["rank"] != 0:  # rank 0 reports and writes the report; the others stay silent
        return 0
    epochs = summary["epochs"]
    done = f"{epochs:g} epochs" if float(epochs).is_integer() else f"{summary['steps']:,} steps ({epochs:.2f} epochs)"
    print(
        f"test accuracy: {summary['test_accuracy']:.4f} ({summary['test_accuracy'] * 100:.2f}%) after "
        f"{done}, {summary['train_seconds']:.1f} s of training"
    )
    print(f"run folder: {summary['run_dir']} (weights: model.safetensors, metrics.csv, summary.json)")
    if cfg.report:
        from .viz.report import build_report

        try:
            print(f"report: {build_report(summary['run_dir'], log=lambda m: None)}")
        except Exception as exc:  # noqa: BLE001  the run itself succeeded: say so, and how to retry
            print(f"warning: no report written ({exc}); run 'cnnlab report {summary['run_dir']}'", file=sys.stderr)
    return 0


def cmd_summary(args) -> int:
    from .models.command import summary_command

    return summary_command(args, _model_args(args.model_arg))


def cmd_report(args) -> int:
    from .viz.report import build_report

    print(build_report(args.run_dir, data_dir=args.data_dir, log=lambda m: print(m, file=sys.stderr)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data.augment import AUGMENT_HELP
    from .models.convnet import SPEC_HELP
    from .training.config import add_config_flags
    from .training.recipes import RECIPES

    parser = _Parser(prog="cnnlab", description="Train, evaluate and look inside the lecture's CNNs.")
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a model (default: the lecture's convnet on Fashion-MNIST)",
        description="Train a model and evaluate it on the test split. Model spec for --model cnn "
        f"--model-arg spec=...: {SPEC_HELP}. Augmentations: {AUGMENT_HELP}.",
    )
    p.add_argument("--config", help="YAML file of config keys (flags override it)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR|auto",
        help="continue the run in RUN_DIR from its last checkpoint; "
        "'auto' (with --run-dir) continues it if it has a checkpoint and starts it otherwise",
    )
    p.add_argument(
        "--nproc-per-node",
        type=_positive_int,
        metavar="N",
        help="train with N processes on this machine "
        "(hands over to torchrun: --standalone; gloo on CPU, NCCL on GPUs); --batch-size stays global",
    )
    p.add_argument(
        "--max-restarts",
        type=_positive_int,
        default=0,
        metavar="R",
        help="with --nproc-per-node: restart all workers up to R times after one fails; they resume from "
        "the last checkpoint",
    )
    p.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        help="a published recipe: he2016 (He et al. 2016's CIFAR "
        "schedule), imagenet (torchvision's ResNet reference: lr 0.1 per 256 images, /10 every 30 of 90 "
        "epochs), airbench94 (Jordan 2024: CIFAR-10 to 94%% in under 10 epochs), fast (resnet20 on CIFAR-10 in 30 "
        "epochs: one-cycle SGD, label smoothing, flip at test time); --epochs N rescales the schedule",
    )
    add_config_flags(p)
    p.add_argument(
        "--no-report", dest="report", action="store_const", const="false", help="do not write report.html at the end"
    )

    p = sub.add_parser("summary", help="layers, output shapes, parameters and MACs of a model")
    p.add_argument("model")
    p.add_argument("--input-size", type=_input_size, metavar="C,H,W", help="default: the model's native size")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("models", help="list the registered models with parameters and MACs")
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="list the weights that come with cnnlab instead: test accuracy, size and the command that trained each",
    )
    p.add_argument("--json", action="store_true")

    from .data.command import add_data_parser
    from .inference.command import add_infer_parsers
    from .training.launch import add_lr_find_parser
    from .viz.command import add_viz_parsers

    add_infer_parsers(sub)
    add_data_parser(sub)

    add_viz_parsers(sub, _positive_int)
    add_lr_find_parser(sub)

    p = sub.add_parser("report", help="one self-contained HTML page on a run (also written by train)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data-dir", help="where the test split is, if not where the run found it")

    from .experiments.command import add_experiment_parser

    add_experiment_parser(sub)
    return parser


# Each subcommand and the function that runs it: it parses nothing more, calls the library and prints.
COMMANDS = {
    "train": cmd_train,
    "lr-find": _lazy("training.launch", "lr_find_command"),
    "eval": _lazy("inference.command", "eval_command"),
    "predict": _lazy("inference.command", "predict_command"),
    "export": _lazy("inference.command", "export_command"),
    "summary": cmd_summary,
    "report": cmd_report,
    "models": _lazy("models.command", "models_command"),
    "viz": _lazy("viz.command", "viz_command"),
    "explain": _lazy("viz.command", "explain_command"),
    "serve": _lazy("serve", "serve_command"),
    "data": _lazy("data.command", "data_command"),
    "experiment": _lazy("experiments.command", "experiment_command"),
}


def main(argv: list[str] | None = None, *, fit_options: dict | None = None) -> int:
    """The `cnnlab` command. `fit_options` go to `cnnlab.fit` for `train` (tests inject a loss function there)."""
    from .training.trainer import TrainingInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        if args.command == "train":
            return cmd_train(args, fit_options)
        return COMMANDS[args.command](args)
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except CnnlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a folder we were told to write into is read-only, full or missing
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
