"""The command line: argparse subcommands, each a thin call into the library."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
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
    """argparse, but an unknown flag names the nearest known ones of the same command."""

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
            (sub or self).error(f"unknown option(s): {', '.join(hints)}; "
                                f"'cnnlab {command or ''} --help' lists them all".replace("  ", " "))
        return namespace, extras


def _input_size(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
        if min(c, h, w) < 1:
            raise ValueError
        return c, h, w
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected C,H,W such as 3,32,32") from None


def _model_args(items: list[str] | None) -> dict:
    from .engine.config import _flag_value
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-arg {item!r}: expected KEY=VALUE")
        out[key] = _flag_value(value)
    return out


def _train_config(args):
    """defaults, then the recipe, then the YAML file, then flags."""
    from .engine.config import TrainConfig, config_from_args, load_config

    base = TrainConfig()
    if args.recipe:
        from .engine.recipes import apply_recipe
        model = args.model or (load_config(args.config).model if args.config else base.model)
        base = apply_recipe(base, args.recipe, model)
    if args.config:
        base = load_config(args.config, base)
    return config_from_args(args, base)


def _resume_target(args):
    """(run folder to resume, resume mode) from --resume RUN_DIR or --resume auto (with --run-dir)."""
    if args.resume == "auto":
        if not args.run_dir:
            raise ConfigError("--resume auto needs --run-dir DIR: the run to continue if it has a checkpoint, "
                              "or to start if it has none")
        return Path(args.run_dir), "auto"
    return Path(args.resume), True


def cmd_train(args, fit_options: dict | None = None) -> int:
    from .engine.config import TrainConfig, config_from_args, load_config
    from .engine.trainer import fit, resume_config

    if args.nproc_per_node:
        return _hand_over_to_torchrun(args)
    if args.resume:
        run_dir, mode = _resume_target(args)
        if args.config or args.recipe:
            raise ConfigError("--resume takes the run's own config.yaml; leave out --config and --recipe")
        if mode == "auto" and not (run_dir / "config.yaml").is_file():
            cfg = _train_config(args)  # nothing to continue yet: start it
        else:
            changed = [k for k, v in vars(args).items() if v is not None and k in TrainConfig.__dataclass_fields__
                       and k != "run_dir"]
            overrides = config_from_args(args, load_config(run_dir / "config.yaml")) \
                if (run_dir / "config.yaml").is_file() else None
            cfg = resume_config(run_dir, overrides, changed)
        summary = fit(cfg, resume=mode, **(fit_options or {}))
    else:
        cfg = _train_config(args)
        summary = fit(cfg, **(fit_options or {}))
    from .engine.runtime import distributed_env
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


def _hand_over_to_torchrun(args) -> int:
    """`cnnlab train --nproc-per-node N ...` is `torchrun --standalone --nproc-per-node N -m cnnlab train ...`,
    with the run folder chosen here so that workers restarted after a failure find it."""
    from torch.distributed.run import main as torchrun

    from .engine.run_folder import default_run_dir

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
        rest += ["--run-dir", str(default_run_dir(_train_config(args)))]
    launcher = ["--standalone", f"--nproc-per-node={args.nproc_per_node}", f"--max-restarts={args.max_restarts}",
                "-m", "cnnlab", *rest]
    print(f"torchrun {' '.join(launcher)}", file=sys.stderr)
    try:
        torchrun(launcher)
    except Exception as exc:  # torchrun's ChildFailedError lists each failed rank and its exit code
        if hasattr(exc, "sigval"):  # the agent itself was signalled: the workers checkpointed and stopped
            return 128 + int(exc.sigval)
        failures = getattr(exc, "failures", {})
        codes = sorted({f.exitcode for f in failures.values()}) if failures else [1]
        print(f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
              file=sys.stderr)
        return next((c for c in codes if c in (130, 143)), 1)
    return 0


def cmd_eval(args) -> int:
    from .engine.config import load_config
    from .engine.evaluate import evaluate, inference_runtime, most_confused
    from .engine.test_split import open_test_split
    from .engine.weights import load_weights
    from .files import save_atomic
    from .models.packaged import get_packaged, is_packaged
    from .viz.plots import plot_confusion

    # a run folder's own config (or the registry, for packaged weights) says where its data is and how it was
    # trained; flags override it
    target = Path(args.target)
    run_cfg = load_config(target / "config.yaml") if (target / "config.yaml").is_file() else None
    trained = json.loads((target / "summary.json").read_text()) if (target / "summary.json").is_file() else {}
    packaged = get_packaged(args.target) if not target.exists() and is_packaged(args.target) else None
    if packaged is not None:
        trained = {"test_accuracy": packaged.test_accuracy, "precision": packaged.precision, "test_tta": packaged.tta}
    precision = args.precision or trained.get("precision") or "auto"
    tta = args.tta if args.tta is not None else int(trained.get("test_tta") or 0)
    runtime = inference_runtime(args.device, precision)
    loaded = load_weights(args.target, runtime.device)
    dataset = args.dataset or loaded.meta.get("dataset")
    same_data = dataset == (run_cfg.dataset if run_cfg else packaged.dataset if packaged else None)
    data_dir = args.data_dir or (run_cfg.data_dir if same_data and run_cfg else None)
    split = open_test_split(dataset, data_dir, input_shape=loaded.input_shape, mean=loaded.mean, std=loaded.std,
                            runtime=runtime, streamed=same_data and trained.get("data_mode") == "stream",
                            workers=run_cfg.workers if run_cfg else 2, log=lambda m: print(m, file=sys.stderr))
    if len(split.classes) != len(loaded.classes):
        raise CnnlabError(f"{dataset} has {len(split.classes)} classes, but the model was trained on "
                          f"{len(loaded.classes)}")
    model = loaded.model.to(runtime.device, memory_format=runtime.memory_format)
    result = evaluate(model, split.loader, len(loaded.classes), runtime=runtime, tta=tta)
    result["per_class"] = dict(zip(split.classes, result["per_class"]))
    result["most_confused"] = most_confused(result["confusion"], split.classes)
    result.update({"dataset": dataset, "weights": str(loaded.path), "classes": split.classes,
                   "precision": runtime.precision, "tta": tta})
    # never into the installed package: packaged weights are evaluated into ./eval/NAME
    out_dir = Path(args.out) if args.out else Path("eval") / packaged.name if packaged else loaded.path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    save_atomic(json.dumps(result, indent=2).encode(), out_dir / "eval.json")
    plot_confusion(result["confusion"], split.classes, out_dir / "confusion.png",
                   title=f"{loaded.meta['model']} on {dataset} test: accuracy {result['accuracy']:.2%}")
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{dataset} test split, {result['n']:,} images: accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}"
          + (f", top-5 {result['top5']:.4f}" if "top5" in result else "")
          + f" ({runtime.precision}{f', test-time augmentation level {tta}' if tta else ''})")
    if trained.get("test_accuracy") is not None and same_data:
        differs = abs(trained["test_accuracy"] - result["accuracy"]) >= 0.5 / max(result["n"], 1)
        why = []
        if trained.get("precision") != runtime.precision:
            why.append(f"training evaluated in {trained.get('precision')}, this in {runtime.precision}: the "
                       "rounding differs, so images near a decision boundary can flip")
        if int(trained.get("test_tta") or 0) != tta:
            why.append(f"training used test-time augmentation level {trained.get('test_tta') or 0}, this {tta}")
        note = f" ({'; '.join(why)})" if differs and why else ""
        source = "the registry of packaged weights lists" if packaged else "training reported"
        print(f"{source} {trained['test_accuracy']:.4f} for these weights{note}")
    width = max(map(len, split.classes))
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {acc:.4f}")
    print("most confused (true -> predicted: count):")
    for pair in result["most_confused"]:
        print(f"  {pair['true']} -> {pair['predicted']}: {pair['count']}")
    print(f"written: {out_dir / 'eval.json'}, {out_dir / 'confusion.png'}")
    return 0


def cmd_predict(args) -> int:
    from .engine.predict import expand_inputs, predict_files
    from .engine.runtime import pick_device
    from .engine.weights import load_weights

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


def _native_input(model) -> tuple[int, int, int]:
    size = getattr(model, "input_size", (224, 224))
    return getattr(model, "in_channels", 3), *size


def cmd_summary(args) -> int:
    from .models import create_model
    from .models.registry import accepts
    from .models.summary import format_summary, summarize

    kwargs = _model_args(args.model_arg)
    if args.num_classes:
        kwargs["num_classes"] = args.num_classes
    if args.input_size:
        kwargs.setdefault("in_channels", args.input_size[0])
        kwargs.setdefault("input_size", list(args.input_size[1:]))
    # a model that adapts to any input size (global pooling) takes no input_size argument
    kwargs = {k: v for k, v in kwargs.items() if k not in ("in_channels", "input_size") or accepts(args.model, k)}
    if args.input_size:
        from .models.summary import check_input_size
        check_input_size(args.model, kwargs, args.input_size, what="--input-size")
    model = create_model(args.model, **kwargs)
    info = summarize(model, args.input_size or _native_input(model))
    print(json.dumps(info) if args.json else format_summary(info, title=args.model))
    return 0


def cmd_pretrained(args) -> int:
    """`cnnlab models --pretrained`: the packaged weights, their test accuracy and how each was made."""
    from .models.packaged import list_packaged

    entries = list_packaged()
    if args.json:
        print(json.dumps([e.record for e in entries]))
        return 0
    if not entries:
        print("no packaged weights in this install")
        return 0
    width = max(len(e.name) for e in entries)
    print(f"{'name':<{width}}  {'model':<9} {'dataset':<14} {'test acc':>8}  {'size':>7}  trained")
    for e in entries:
        tta = f" (tta {e.tta})" if e.tta else ""
        print(f"{e.name:<{width}}  {e.model:<9} {e.dataset:<14} {e.test_accuracy:>8.2%}  {e.bytes / 1e6:>5.2f}MB  "
              f"{e.epochs:g} epochs, {e.train_seconds / 60:,.0f} min on {e.cpu}, {e.threads} thread(s), "
              f"{e.precision}, torch {e.torch}{tta}")
        print(f"{'':<{width}}  $ {e.command}")
    print("(use a name wherever RUN_DIR|WEIGHTS is taken, e.g. 'cnnlab predict resnet20-cifar10 photo.jpg', or "
          "create_model('resnet20', weights='cifar10'); each file is checked against its sha256 when loaded)")
    return 0


def cmd_models(args) -> int:
    from .models import create_model, list_models
    from .models.registry import model_entrypoint
    from .models.summary import summarize

    import torch

    if args.pretrained:
        return cmd_pretrained(args)
    rows = []
    for name in list_models():
        with torch.device("meta"):  # shapes, parameter counts and MACs need no memory and no arithmetic
            model = create_model(name)
        size = _native_input(model)
        info = summarize(model, size)
        doc = (model_entrypoint(name).__doc__ or "").strip().splitlines()[0]
        rows.append({"name": name, "params": info["params"], "macs": info["macs"], "input_size": list(size),
                     "description": doc})
    if args.json:
        print(json.dumps(rows))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'model':<{width}} {'params':>12} {'MACs':>14}  {'input':<9} description")
    for r in rows:
        print(f"{r['name']:<{width}} {r['params']:>12,} {r['macs']:>14,}  {'x'.join(map(str, r['input_size'])):<9} "
              f"{r['description']}")
    print("(MACs per image at the native input size; 1 MAC = 2 FLOPs; weights that come with cnnlab: "
          "cnnlab models --pretrained)")
    return 0


def cmd_data(args) -> int:
    from .data import CATALOG, fetch, get_spec, load_dataset, locate
    from .errors import DatasetError

    if args.action == "list":
        for spec in CATALOG.values():
            try:
                _, folder, paths = locate(spec, args.data_dir) if spec.format not in ("imagefolder", "shards", "synthetic") \
                    else (None, None, [])
                size = sum(p.stat().st_size for p in paths)
                where = f"found in {folder} ({size / 2**20:.1f} MiB)" if folder else spec.how_to_get
            except DatasetError:
                where = f"not found; to get it: {spec.how_to_get}"
            counts = " / ".join(f"{n:,} {s}" for s, n in spec.counts.items())
            print(f"{spec.name:<14} {spec.description}{'; ' + counts if counts else ''}\n{'':<14} {where}")
        return 0
    if args.action == "pack":
        from .data.shards import pack_image_folder
        if not args.name or not args.dest:
            raise ConfigError("'cnnlab data pack ROOT OUT': give the image folder and the folder for the shards")
        manifest = pack_image_folder(args.name, args.dest, args.shard_size)
        print(f"{sum(manifest['counts'].values()):,} images of {len(manifest['classes'])} classes packed into "
              f"{args.dest}; train from them with --dataset shards --data-dir {args.dest}")
        return 0
    if not args.name:
        raise CnnlabError(f"'cnnlab data {args.action}' needs a dataset name: {', '.join(CATALOG)}")
    if args.action == "fetch":
        if get_spec(args.name).format == "synthetic":
            print(f"{args.name} is generated in memory whenever it is used; there is nothing to fetch")
            print(load_dataset(args.name).describe())
            return 0
        try:
            _, folder, _ = locate(get_spec(args.name), args.data_dir)
            print(f"{args.name} is already available in {folder}")
        except DatasetError:
            folder = fetch(args.name)
            print(f"{args.name} downloaded and verified into {folder}")
        print(load_dataset(args.name, args.data_dir).describe())
        return 0
    # info
    from .data import channel_stats
    from .viz.plots import plot_montage
    import torch

    data = load_dataset(args.name, args.data_dir, download=args.download)
    print(data.describe())
    mean, std = channel_stats(data.train_images)
    print(f"train mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]} (pixels scaled to [0, 1])")
    train_counts = torch.bincount(data.train_labels, minlength=len(data.classes)).tolist()
    test_counts = torch.bincount(data.test_labels, minlength=len(data.classes)).tolist()
    width = max(map(len, data.classes))
    print(f"{'class':<{width}}  {'train':>7}  {'test':>6}")
    for name, a, b in zip(data.classes, train_counts, test_counts):
        print(f"{name:<{width}}  {a:>7,}  {b:>6,}")
    if not args.out:
        print("(add --out FILE.png for a montage of training samples per class)")
        return 0
    plot_montage(data.train_images, data.train_labels, data.classes, Path(args.out),
                 title=f"{args.name}: training samples")
    print(f"montage written to {args.out}")
    return 0


def _out_dir(args, target: str | None = None) -> Path:
    """--out, else RUN_DIR/viz for a run folder, else ./viz; made only when the first file is written."""
    return Path(args.out) if args.out else Path(target) / "viz" if target and Path(target).is_dir() else Path("viz")


def _load_for_viz(args):
    from .engine.weights import load_weights
    return load_weights(args.target, "cpu", model_name=getattr(args, "model", None))


def _default(value, default):
    return default if value is None else value


def cmd_viz(args) -> int:
    out = _out_dir(args, args.target)
    if args.what == "conv" and args.html:
        from .viz.conv_page import write_conv_page
        print(write_conv_page(out / "conv.html", image=args.image, filters=_default(args.filters, 2),
                              size=_default(args.size, 7)))
    elif args.what == "conv":
        from .viz.slides import render_conv
        paths = render_conv(out, image=args.image, filters=_default(args.filters, 5), size=_default(args.size, 16))
        print("\n".join(map(str, paths)))
    elif args.what == "pool":
        from .viz.conv import edge_feature_map, load_image
        from .viz.pool import render_pool
        image = load_image(args.image, gray=False) if args.image else None
        result = render_pool(out, feature_map=edge_feature_map(image))
        print(result["caption"])
        print(result["path"])
    elif args.what == "filters":
        from .viz.filters import conv_layers, layer_weight, plot_filters
        loaded = _load_for_viz(args)
        name, weight = layer_weight(loaded.model, args.layer)
        first = name == next(iter(conv_layers(loaded.model)))
        path = out / f"filters-{name.replace('.', '_')}.png"
        plot_filters(weight, path, layer=name, first_layer=first)
        print(f"{name}: {weight.shape[0]} filters of {'x'.join(map(str, weight.shape[1:]))} -> {path}")
    elif args.what == "features":
        from .engine.predict import load_image
        from .viz.filters import default_feature_layers, feature_maps, layer_kinds, plot_feature_maps
        if not args.image:
            raise ConfigError("'cnnlab viz features RUN_DIR IMAGE': give the image to look at")
        loaded = _load_for_viz(args)
        pixels, _ = load_image(Path(args.image), loaded.input_shape, loaded.meta.get("resize"))
        import torch
        x = loaded.normalise(torch.tensor(pixels)[None])
        layers = args.layers.split(",") if args.layers else default_feature_layers(loaded.model)
        maps = feature_maps(loaded.model, x, layers)
        kinds = layer_kinds(loaded.model, list(maps))
        path = out / f"features-{Path(args.image).stem}.png"  # one file per image: a second image keeps the first
        plot_feature_maps(maps, pixels.transpose(1, 2, 0), path, title=f"Feature maps of {Path(args.image).name}",
                          kinds=kinds)
        for name, act in maps.items():
            print(f"{name}: {tuple(act.shape)} {kinds[name]}")
        print(path)
    elif args.what == "cam":
        from .viz.gradcam import cam_files
        if not args.image:
            raise ConfigError("'cnnlab viz cam RUN_DIR IMAGE...': give the images to explain")
        loaded = _load_for_viz(args)
        for path, r in cam_files(loaded, [args.image, *args.more_images], out, args.layer, args.cam_class):
            print(f"{path}: layer {r.layer}, class {loaded.classes[r.target]} "
                  f"(probability {float(r.probs[r.target]):.3f})")
    elif args.what == "gabor":
        from .viz.filters import layer_weight
        from .viz.gabor import analyze_filters, format_gabor_summary
        loaded = _load_for_viz(args)
        _, weight = layer_weight(loaded.model)
        result = analyze_filters(weight, out, threshold=args.threshold)
        print(format_gabor_summary(result))
    return 0


def _viz_entry(args) -> int:
    if args.what in ("filters", "features", "gabor", "cam") and not args.target:
        raise ConfigError(f"'cnnlab viz {args.what}' needs RUN_DIR or a weights file")
    if args.what in ("conv", "pool"):
        if args.target:
            raise ConfigError(f"'cnnlab viz {args.what}' takes no RUN_DIR; give your image with --image PATH")
        args.image = args.image_flag
    if args.html and args.what != "conv":
        raise ConfigError(f"--html is for 'cnnlab viz conv'; 'cnnlab viz {args.what}' writes PNG files")
    # folders that do not exist yet: if the command fails, those it made and left empty are removed again
    out = _out_dir(args, args.target).absolute()
    new = [folder for folder in (out, *out.parents) if not folder.exists()]
    try:
        return cmd_viz(args)
    except BaseException:
        for folder in new:
            try:
                folder.rmdir()  # only ever removes an empty folder
            except OSError:
                break
        raise


def cmd_explain(args) -> int:
    from .engine.predict import expand_inputs
    from .engine.weights import load_weights
    from .viz.explain import explain_data, explain_files, pick_test_images, write_explain_page

    if args.budget_mb <= 0:
        raise ConfigError(f"--budget-mb {args.budget_mb}: give a positive size in MB")
    loaded = load_weights(args.target, "cpu", model_name=args.model)
    options = {"cam_layer": args.layer, "budget": int(args.budget_mb * 1e6)}
    if args.images:
        paths = expand_inputs(args.images)
        if not paths:
            raise CnnlabError(f"no image files in {', '.join(args.images)}")
        data = explain_files(loaded, paths, **options)
    else:
        images, names, labels = pick_test_images(args.target, loaded, args.count, args.data_dir,
                                                 log=lambda m: print(m, file=sys.stderr))
        data = explain_data(loaded, images, names, labels, **options)
    target = Path(args.target)
    out = Path(args.out) if args.out else target / "explain.html" if target.is_dir() else Path("explain.html")
    path = write_explain_page(out, data)
    print(f"{path} ({path.stat().st_size / 1e6:.2f} MB, {len(data['images'])} image(s), "
          f"{data['cap']} maps per layer at most)")
    return 0


def cmd_serve(args) -> int:
    from .engine.weights import load_weights
    from .serve import serve

    loaded = load_weights(args.target, "cpu", model_name=args.model)
    test_images = None
    if Path(args.target).is_dir() and (Path(args.target) / "config.yaml").is_file():
        from .viz.explain import pick_test_images
        try:
            test_images = pick_test_images(args.target, loaded, 16, args.data_dir,
                                           log=lambda m: print(m, file=sys.stderr))
        except CnnlabError as exc:  # the page still takes uploads
            print(f"note: no test images to pick on the page ({exc})", file=sys.stderr)
    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb {args.max_upload_mb}: give a positive size in MB")
    serve(loaded, args.host, args.port, log=lambda m: print(m, file=sys.stderr, flush=True),
          test_images=test_images, cam_layer=args.layer, max_upload_bytes=int(args.max_upload_mb * 1e6))
    return 0


def cmd_report(args) -> int:
    from .viz.report import build_report
    print(build_report(args.run_dir, data_dir=args.data_dir, log=lambda m: print(m, file=sys.stderr)))
    return 0


def cmd_export(args) -> int:
    from .engine.export import FP32_ERROR_FACTOR, export_model
    from .engine.weights import load_weights

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


def cmd_experiment(args) -> int:
    from dataclasses import fields
    from .engine.config import TrainConfig
    from .experiments import ExperimentInterrupted, default_folder, gather, run_experiment
    from .experiments.flags import check_devices, default_threads, member_train_args

    if args.kind == "gather":
        results = gather(args.folder)
        members = results.get("members") or results.get("runs")
        return 0 if all(m["status"] == "finished" for m in members) else 1
    from .experiments import degradation_spec, parse_depths, parse_seeds, seeds_spec
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    devices = check_devices(args.devices)
    if devices and "device" in values:
        raise ConfigError("give either --device (every member) or --devices (member i on device i mod the list)")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: must be at least 1")
    refused = {"run_dir": "each member gets its own folder under --out"}
    if args.kind == "degradation":
        refused.update(model="the degradation experiment trains cifar_plain and cifar_resnet at each of --depths",
                       model_args="the degradation experiment sets depth itself; give --depths")
        depths = parse_depths(args.depths)
        train_args, given, execution = member_train_args(values, args.recipe, refused,
                                                         models=("cifar_plain", "cifar_resnet"))
        spec = degradation_spec(depths, train_args, args.tolerance)
        options = f"--depths {','.join(map(str, depths))} --recipe {args.recipe} --tolerance {args.tolerance}"
    else:
        refused["seed"] = "give the seeds with --seeds 0,1,2 or --runs N"
        seeds = parse_seeds(args.runs, args.seeds)
        train_args, given, execution = member_train_args(values, args.recipe, refused)
        spec = seeds_spec(seeds, train_args, args.threshold)
        options = (f"--seeds {','.join(map(str, seeds))}" + (f" --recipe {args.recipe}" if args.recipe else "")
                   + (f" --threshold {args.threshold}" if args.threshold is not None else ""))
    spec.options["train_flags"] = train_args
    if args.jobs > 1 and not devices and "threads" not in values:
        execution += ["--threads", str(default_threads(args.jobs))]
    import shlex
    folder = Path(args.out) if args.out else default_folder(args.kind)
    command = f"cnnlab experiment {args.kind} {options} --out {shlex.quote(str(folder))} {shlex.join(given)}"
    try:
        run_experiment(folder, spec, command.strip(), jobs=args.jobs, devices=devices, execution=execution,
                       print_commands=args.print_commands)
    except ExperimentInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    return 0


def _add_experiment_parser(sub) -> None:
    from .engine.config import add_config_flags

    from .engine.recipes import RECIPES

    p = sub.add_parser("experiment", help="several training runs as one experiment: degradation, seeds, gather",
                       description="Experiments over ordinary 'cnnlab train' runs.")
    kinds = p.add_subparsers(dest="kind", required=True)
    for kind, help_text in (
            ("degradation", "He et al. 2016's degradation experiment: plain nets and ResNets at several depths, "
                            "one recipe; results.json with a verdict, experiment.html with the Fig. 6 curves"),
            ("seeds", "one recipe with several seeds: mean, sample std and the share of runs at or above "
                      "--threshold")):
        k = kinds.add_parser(kind, help=help_text, description=help_text, epilog=_EXPERIMENT_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        if kind == "degradation":
            k.add_argument("--depths", default="20,32,44,56", help="depths of the form 6n+2 (default: 20,32,44,56)")
            k.add_argument("--recipe", default="he2016_warmup", choices=("he2016_warmup", "he2016", "none"),
                           help="he2016_warmup (default): He et al. 2016's recipe, every member warmed up from 0.01 "
                                "rising linearly to 0.1 over the first epoch; --epochs N scales it")
            k.add_argument("--tolerance", type=float, default=0.01,
                           help="training-error gap (fraction) within which a deeper net counts as no worse "
                                "(default: 0.01, one percentage point)")
        else:
            k.add_argument("--runs", type=int, help="seeds 0..N-1 (default: 5)")
            k.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
            k.add_argument("--recipe", choices=tuple(RECIPES), help="a published recipe for every run (e.g. "
                           "airbench94 or fast)")
            k.add_argument("--threshold", type=float, help="test accuracy (fraction, e.g. 0.94) whose share of runs "
                                                           "at or above it is reported")
        k.add_argument("--out", metavar="DIR", help="experiment folder (default: experiments/<kind>-<time>/)")
        k.add_argument("--jobs", type=int, default=1, help="members trained at once (default: 1)")
        k.add_argument("--devices", metavar="LIST", help="e.g. cuda:0,cuda:1: member i runs on device i mod the list")
        k.add_argument("--print-commands", action="store_true",
                       help="print one 'cnnlab train' line per member and the gather command; train nothing")
        add_config_flags(k)
        k.add_argument("--no-report", dest="report", action="store_const", const="false",
                       help="members write no report.html")
        k.set_defaults(func=cmd_experiment)
    g = kinds.add_parser("gather", help="write results.json and experiment.html from the member folders (no "
                                        "training); exit code 1 while members are unfinished")
    g.add_argument("folder", metavar="DIR")
    g.set_defaults(func=cmd_experiment)


def build_parser() -> argparse.ArgumentParser:
    from .data.augment import AUGMENT_HELP
    from .engine.config import add_config_flags
    from .engine.export import DEFAULT_OPSET, DEFAULT_TOLERANCE, FORMATS
    from .engine.recipes import RECIPES
    from .models.convnet import SPEC_HELP

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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate trained weights on a test split")
    p.add_argument("target", metavar="RUN_DIR|WEIGHTS")
    p.add_argument("--dataset", help="dataset (default: the one the model was trained on)")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="folder for eval.json and confusion.png (default: next to the weights)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="default: the precision the run was trained in (auto for a weights file)")
    p.add_argument("--tta", type=int, choices=(0, 1, 2), help="test-time augmentation: 0 none, 1 mirror, 2 mirror and "
                   "1-pixel shifts (default: what the run's final evaluation used)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="classify image files or folders of images")
    p.add_argument("target", metavar="RUN_DIR|WEIGHTS")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--model", help="model name for a plain state-dict file without a sidecar (e.g. torchvision's "
                                   "resnet50 .pth; preprocessing is then ImageNet's resize 256, centre crop 224)")
    p.add_argument("--classes", help="text file of class names, one per line, in output order")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 only where a probe measures it clearly faster here (as training decides)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

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
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("summary", help="layers, output shapes, parameters and MACs of a model")
    p.add_argument("model")
    p.add_argument("--input-size", type=_input_size, metavar="C,H,W", help="default: the model's native size")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("models", help="list the registered models with parameters and MACs")
    p.add_argument("--pretrained", action="store_true", help="list the weights that come with cnnlab instead: "
                   "test accuracy, size and the command that trained each")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("viz", help="pictures: convolution and pooling, filters, feature maps, the V1 comparison",
                       description="conv: the lecture's convolution slides (GIFs and PNGs), or with --html an "
                                   "interactive page; pool: max pooling on a "
                                   "feature map; filters RUN_DIR|WEIGHTS: a layer's filters; features RUN_DIR IMAGE: "
                                   "activation maps; gabor RUN_DIR|WEIGHTS: Gabor fits of the first layer against "
                                   "macaque V1 (Ringach 2002); cam RUN_DIR IMAGE...: Grad-CAM overlays (Selvaraju et al. 2017)")
    p.add_argument("what", choices=("conv", "pool", "filters", "features", "gabor", "cam"))
    p.add_argument("target", nargs="?", metavar="RUN_DIR|WEIGHTS", help="for filters, features, gabor and cam")
    p.add_argument("image", nargs="?", metavar="IMAGE", help="for features and cam")
    p.add_argument("more_images", nargs="*", metavar="IMAGE", help="cam: more images")
    p.add_argument("--class", dest="cam_class", metavar="NAME|INDEX", help="cam: the class to explain (default: "
                   "each image's predicted class)")
    p.add_argument("--image", dest="image_flag", metavar="PATH", help="conv and pool: your own image")
    p.add_argument("--html", action="store_true", help="conv: write conv.html, an interactive page (window "
                   "stepping, stride, padding, max pooling) instead of the slides")
    p.add_argument("--filters", type=int, help="conv: filters on the colour slide (1-8; default 5) or on the page "
                   "(default 2)")
    p.add_argument("--size", type=int, help="conv: image side in pixels (default 16 on the slides, 3-32; 7 on the "
                   "page, 4-12)")
    p.add_argument("--layer", help="filters: a conv layer by dotted name (default: the first); cam: the layer "
                   "Grad-CAM looks at (default: the last convolutional stage)")
    p.add_argument("--layers", help="features: comma-separated layer names (default: the first 3 conv layers "
                   "and the last)")
    p.add_argument("--threshold", type=float, default=0.5, help="gabor: R^2 at which a fit counts as good")
    p.add_argument("--model", help="model name for a plain state-dict file without a sidecar")
    p.add_argument("--out", help="output folder (default RUN_DIR/viz, or ./viz)")
    p.set_defaults(func=_viz_entry)

    p = sub.add_parser("explain", help="one self-contained page: your model's layers on your images, the "
                       "arithmetic of any unit, Grad-CAM", description="Every layer's output maps for each image "
                       "(without images: a few of the run's test images, right and wrong ones), a click on a map "
                       "for one pixel's arithmetic, Grad-CAM for each class. Inline script and styles, images as "
                       "data: URIs: it fetches nothing, works offline and can be mailed.")
    p.add_argument("target", metavar="RUN_DIR|WEIGHTS")
    p.add_argument("images", nargs="*", metavar="IMAGE|DIR")
    p.add_argument("--out", metavar="FILE", help="default RUN_DIR/explain.html, or ./explain.html")
    p.add_argument("--count", type=_positive_int, default=8, help="test images to pick without IMAGE (default 8)")
    p.add_argument("--layer", help="the layer Grad-CAM looks at (default: the last convolutional stage)")
    p.add_argument("--budget-mb", type=float, default=5.0, help="page size to stay within: larger models show "
                   "fewer maps per layer (default 5)")
    p.add_argument("--data-dir", help="where the run's test split is, if not where the run found it")
    p.add_argument("--model", help="model name for a plain state-dict file without a sidecar")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("serve", help="the explain page live and a JSON prediction API (FastAPI + uvicorn)",
                       description="GET / : the explain page, taking uploaded, dropped or pasted images; POST "
                                   "/v1/predict: image files -> what 'cnnlab predict --json' gives; GET /v1/model, "
                                   "/healthz; OpenAPI at /docs and /openapi.json. Needs the serve extra: "
                                   "pip install 'cnnlab[serve]'.")
    p.add_argument("target", metavar="RUN_DIR|WEIGHTS")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; any other is reachable by others, with no authentication)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest file accepted, in MB (default 20; "
                   "images are also held to 64 megapixels)")
    p.add_argument("--layer", help="the layer Grad-CAM looks at (default: the last convolutional stage)")
    p.add_argument("--data-dir", help="where the run's test split is, if not where the run found it")
    p.add_argument("--model", help="model name for a plain state-dict file without a sidecar")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="one self-contained HTML page on a run (also written by train)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data-dir", help="where the test split is, if not where the run found it")
    p.set_defaults(func=cmd_report)

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
    p.set_defaults(func=cmd_data)

    _add_experiment_parser(sub)
    return parser


def main(argv: list[str] | None = None, *, fit_options: dict | None = None) -> int:
    """The `cnnlab` command. `fit_options` go to `cnnlab.fit` for `train` (tests inject a loss function there)."""
    from .engine.trainer import TrainingInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        if args.func is cmd_train:
            return cmd_train(args, fit_options)
        return args.func(args)
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
