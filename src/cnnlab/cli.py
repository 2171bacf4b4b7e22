"""The command line: argparse subcommands, each a thin call into the library."""
from __future__ import annotations

import argparse
import json
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
        self.exit(2, f"cnnlab{' ' + command if command else ''}: error: {message} ('cnnlab "
                     f"{command + ' ' if command else ''}--help' lists the options)\n")

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
    from .train.config import _flag_value
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-arg {item!r}: expected KEY=VALUE")
        out[key] = _flag_value(value)
    return out


def _train_config(args):
    from .train.launch import train_config
    return train_config(args)


def _resume_target(args):
    """(run folder to resume, resume mode) from --resume RUN_DIR or --resume auto (with --run-dir)."""
    if args.resume == "auto":
        if not args.run_dir:
            raise ConfigError("--resume auto needs --run-dir DIR: the run to continue if it has a checkpoint, "
                              "or to start if it has none")
        return Path(args.run_dir), "auto"
    return Path(args.resume), True


def cmd_train(args, fit_options: dict | None = None) -> int:
    from .run import Run, is_run_folder
    from .train.config import TrainConfig, config_from_args
    from .train.trainer import fit, resume_config

    if args.nproc_per_node:
        from .train.launch import hand_over_to_torchrun
        return hand_over_to_torchrun(args, _train_config)
    if args.resume:
        run_dir, mode = _resume_target(args)
        if args.config or args.recipe:
            raise ConfigError("--resume takes the run's own config.yaml; leave out --config and --recipe")
        if mode == "auto" and not is_run_folder(run_dir):
            cfg = _train_config(args)  # nothing to continue yet: start it
        else:
            changed = [k for k, v in vars(args).items() if v is not None and k in TrainConfig.__dataclass_fields__
                       and k != "run_dir"]
            overrides = config_from_args(args, Run(run_dir).config) if is_run_folder(run_dir) else None
            cfg = resume_config(run_dir, overrides, changed)
        summary = fit(cfg, resume=mode, **(fit_options or {}))
    else:
        cfg = _train_config(args)
        summary = fit(cfg, **(fit_options or {}))
    from .train.runtime import distributed_env
    if distributed_env()["rank"] != 0:  # rank 0 reports and writes the report; the others stay silent
        return 0
    epochs = summary["epochs"]
    done = f"{epochs:g} epochs" if float(epochs).is_integer() else f"{summary['steps']:,} steps ({epochs:.2f} epochs)"
    print(f"test accuracy: {summary['test_accuracy']:.4f} ({summary['test_accuracy'] * 100:.2f}%) after "
          f"{done}, {summary['train_seconds']:.1f} s of training")
    print(f"run folder: {summary['run_dir']} (weights: model.safetensors, metrics.csv, summary.json)")
    if cfg.report:
        from .viz.report import build_report
        try:
            print(f"report: {build_report(summary['run_dir'], log=lambda m: None)}")
        except Exception as exc:  # noqa: BLE001  the run itself succeeded: say so, and how to retry
            print(f"warning: no report written ({exc}); run 'cnnlab report {summary['run_dir']}'", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from .infer.evaluate import evaluate_target
    from .run import RUN_FILES
    from .viz.plots import plot_confusion

    ev = evaluate_target(args.target, dataset=args.dataset, data_dir=args.data_dir, device=args.device,
                         precision=args.precision, tta=args.tta, out=args.out,
                         log=lambda m: print(m, file=sys.stderr))
    result = ev.result
    plot_confusion(result["confusion"], result["classes"], ev.out_dir / RUN_FILES["confusion"],
                   title=f"{ev.model} on {result['dataset']} test: accuracy {result['accuracy']:.2%}")
    if args.json:
        print(json.dumps(result))
        return 0
    tta = result["tta"]
    print(f"{result['dataset']} test split, {result['n']:,} images: accuracy {result['accuracy']:.4f}, loss "
          f"{result['loss']:.4f}" + (f", top-5 {result['top5']:.4f}" if "top5" in result else "")
          + f" ({result['precision']}{f', test-time augmentation level {tta}' if tta else ''})")
    if ev.reported is not None:
        note = f" ({'; '.join(ev.differences)})" if ev.differences else ""
        print(f"{ev.reported_by} {ev.reported:.4f} for these weights{note}")
    width = max(map(len, result["classes"]))
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {acc:.4f}")
    print("most confused (true -> predicted: count):")
    for pair in result["most_confused"]:
        print(f"  {pair['true']} -> {pair['predicted']}: {pair['count']}")
    print(f"written: {ev.out_dir / RUN_FILES['eval']}, {ev.out_dir / RUN_FILES['confusion']}")
    return 0


def cmd_predict(args) -> int:
    from .infer.predict import expand_inputs, predict_files
    from .infer.weights import load_weights
    from .train.runtime import pick_device

    if args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: give 1 or more classes to show")
    loaded = load_weights(args.target, pick_device(args.device), model_name=args.model, classes_file=args.classes)
    paths = expand_inputs(args.inputs)
    if not paths:
        raise CnnlabError(f"no image files in {', '.join(args.inputs)}")

    def show(result: dict) -> None:
        if args.json:
            return
        best = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"])
        note = f"  (note: {'; '.join(result['notes'])})" if result["notes"] else ""
        print(f"{result['file']}: {best}{note}")

    results, bad = predict_files(loaded, paths, top_k=args.top_k, on_result=show, precision=args.precision)
    if args.json:
        print(json.dumps({"results": results, "skipped": bad}))
    else:
        for item in bad:
            print(f"skipped: {item['error']}", file=sys.stderr)
        print(f"{len(results)} image(s) classified, {len(bad)} skipped", file=sys.stderr)
    return 0 if results else 1


def cmd_summary(args) -> int:
    from .models.command import summary_command
    return summary_command(args, _model_args(args.model_arg))


def cmd_report(args) -> int:
    from .viz.report import build_report
    print(build_report(args.run_dir, data_dir=args.data_dir, log=lambda m: print(m, file=sys.stderr)))
    return 0


def cmd_export(args) -> int:
    from .infer.export import FP32_ERROR_FACTOR, export_model
    from .infer.weights import load_weights

    loaded = load_weights(args.target, "cpu", model_name=args.model, classes_file=args.classes)
    r = export_model(loaded, args.out, args.format, opset=args.opset, tolerance=args.tolerance, data_dir=args.data_dir)
    c, h, w = loaded.input_shape
    kind = f"ONNX opset {r.opset}" if r.format == "onnx" else "torch.export program"
    print(f"{r.path}: {loaded.meta['model']} as {kind}, {r.bytes / 2**20:.1f} MiB; input float32 N x {c} x {h} x {w} "
          f"in [0, 1] (normalisation inside), output logits over {len(loaded.classes)} classes")
    print(f"checked against PyTorch (fp32, eval) on {r.inputs} at batch {r.batch_sizes[0]} and {r.batch_sizes[1]}: "
          f"max |logit difference| {r.max_abs_diff:.2g} (allowed {r.tolerance:g} x max |logit| {r.logit_scale:.3g}), "
          f"top-1 agreement {r.top1_agree}/{r.top1_total}")
    if r.fp32_error is not None:
        print(f"(above the tolerance, but within {FP32_ERROR_FACTOR} x PyTorch's own fp32 error against float64, "
              f"{r.fp32_error:.2g}: this network amplifies rounding, and the export is as exact as PyTorch itself)")
    if r.metadata_path:
        print(f"metadata: {r.metadata_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data.augment import AUGMENT_HELP
    from .infer.export import DEFAULT_OPSET, DEFAULT_TOLERANCE, FORMATS
    from .models.convnet import SPEC_HELP
    from .train.config import add_config_flags
    from .train.recipes import RECIPES

    parser = _Parser(prog="cnnlab", description="Train, evaluate and look inside the lecture's CNNs.")
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (default: the lecture's convnet on Fashion-MNIST)",
                       description="Train a model and evaluate it on the test split. Model spec for --model cnn "
                                   f"--model-arg spec=...: {SPEC_HELP}. Augmentations: {AUGMENT_HELP}.")
    p.add_argument("--config", help="YAML file of config keys (flags override it)")
    p.add_argument("--resume", metavar="RUN_DIR|auto", help="continue the run in RUN_DIR from its last checkpoint; "
                   "'auto' (with --run-dir) continues it if it has a checkpoint and starts it otherwise")
    p.add_argument("--nproc-per-node", type=_positive_int, metavar="N", help="train with N processes on this machine "
                   "(hands over to torchrun: --standalone; gloo on CPU, NCCL on GPUs); --batch-size stays global")
    p.add_argument("--max-restarts", type=_positive_int, default=0, metavar="R",
                   help="with --nproc-per-node: restart all workers up to R times after one fails; they resume from "
                        "the last checkpoint")
    p.add_argument("--recipe", choices=tuple(RECIPES), help="a published recipe: he2016 (He et al. 2016's CIFAR "
                   "schedule), imagenet (torchvision's ResNet reference: lr 0.1 per 256 images, /10 every 30 of 90 "
                   "epochs), airbench94 (Jordan 2024: CIFAR-10 to 94%% in under 10 epochs), fast (resnet20 on CIFAR-10 in 30 "
                   "epochs: one-cycle SGD, label smoothing, flip at test time); --epochs N rescales the schedule")
    add_config_flags(p)
    p.add_argument("--no-report", dest="report", action="store_const", const="false",
                   help="do not write report.html at the end")

    p = sub.add_parser("eval", help="evaluate trained weights on a test split")
    p.add_argument("target", metavar="RUN_DIR|WEIGHTS")
    p.add_argument("--dataset", help="dataset (default: the one the model was trained on)")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="folder for eval.json and confusion.png (default: next to the weights)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="fp32 (default, as predict and an exported model); bf16; auto: as training decides")
    p.add_argument("--tta", type=int, choices=(0, 1, 2), help="test-time augmentation: 0 none, 1 mirror, 2 mirror and "
                   "1-pixel shifts (default: what the run's final evaluation used)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("predict", help="classify image files or folders of images")
    p.add_argument("target", metavar="RUN_DIR|WEIGHTS")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--model", help="model name for a plain state-dict file without a sidecar (e.g. torchvision's "
                                   "resnet50 .pth; preprocessing is then ImageNet's resize 256, centre crop 224)")
    p.add_argument("--classes", help="text file of class names, one per line, in output order")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="fp32 (default: what 'cnnlab eval' and an exported model compute in); bf16; auto: bf16 only "
                        "where a probe measures it clearly faster here (as training decides)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="write a model as ONNX or a torch.export program, checked against PyTorch",
                       description="Export a run's weights as ONNX (onnxruntime, TensorRT, browsers) or as a "
                                   "torch.export program (.pt2). The file takes float32 N x C x H x W pixels in [0, 1] "
                                   "with any batch size and returns logits; the training normalisation is inside it. "
                                   "It is run on test images (or random inputs) and written only if its logits match "
                                   "PyTorch's within --tolerance.")
    p.add_argument("target", metavar="RUN_DIR|WEIGHTS")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--out", metavar="FILE", help="default: next to the weights, model.onnx or model.pt2")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest |logit difference| allowed, "
                   f"as a fraction of max(1, max |logit|) (default {DEFAULT_TOLERANCE:g}); a difference within 4x "
                   "PyTorch's own fp32 error against float64 passes too")
    p.add_argument("--data-dir", help="where the run's dataset is, for the check (default: where the run found it)")
    p.add_argument("--model", help="model name for a plain state-dict file without a sidecar")
    p.add_argument("--classes", help="text file of class names, one per line, in output order")

    p = sub.add_parser("summary", help="layers, output shapes, parameters and MACs of a model")
    p.add_argument("model")
    p.add_argument("--input-size", type=_input_size, metavar="C,H,W", help="default: the model's native size")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("models", help="list the registered models with parameters and MACs")
    p.add_argument("--pretrained", action="store_true", help="list the weights that come with cnnlab instead: "
                   "test accuracy, size and the command that trained each")
    p.add_argument("--json", action="store_true")

    from .train.launch import add_lr_find_parser
    from .viz.command import add_viz_parsers
    add_viz_parsers(sub, _positive_int)
    add_lr_find_parser(sub)

    p = sub.add_parser("report", help="one self-contained HTML page on a run (also written by train)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data-dir", help="where the test split is, if not where the run found it")

    p = sub.add_parser("data", help="list, fetch, inspect or pack datasets",
                       description="pack ROOT OUT: an image folder (ROOT/train|test/<class>/*) into WebDataset tar "
                                   "shards (the files' own bytes, KEY.<ext> + KEY.cls) and OUT/manifest.json")
    p.add_argument("action", choices=("list", "fetch", "info", "pack"))
    p.add_argument("name", nargs="?", metavar="NAME|ROOT")
    p.add_argument("dest", nargs="?", metavar="OUT", help="pack: the folder for the shards and the manifest")
    p.add_argument("--shard-size", default="256MB", help="pack: bytes per shard, e.g. 256MB or 1GiB")
    p.add_argument("--data-dir")
    p.add_argument("--download", action="store_true", help="info: download the dataset if it is missing")
    p.add_argument("--out", help="info: where to write the montage PNG")

    from .experiments.command import add_experiment_parser
    add_experiment_parser(sub)
    return parser


# Each subcommand and the function that runs it: it parses nothing more, calls the library and prints.
COMMANDS = {
    "train": cmd_train, "lr-find": _lazy("train.launch", "lr_find_command"), "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export, "summary": cmd_summary,
    "report": cmd_report, "models": _lazy("models.command", "models_command"),
    "viz": _lazy("viz.command", "viz_command"), "explain": _lazy("viz.command", "explain_command"),
    "serve": _lazy("serve", "serve_command"), "data": _lazy("data.command", "data_command"),
    "experiment": _lazy("experiments.command", "experiment_command"),
}


def main(argv: list[str] | None = None, *, fit_options: dict | None = None) -> int:
    """The `cnnlab` command. `fit_options` go to `cnnlab.fit` for `train` (tests inject a loss function there)."""
    from .train.trainer import TrainingInterrupted

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
