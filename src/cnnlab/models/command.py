"""`cnnlab models` and `cnnlab summary`: tables of the registered models and the packaged weights (the CLI only
dispatches here)."""

from __future__ import annotations

import json

__all__ = ["models_command", "summary_command", "native_input"]


def native_input(model) -> tuple[int, int, int]:
    size = getattr(model, "input_size", (224, 224))
    return getattr(model, "in_channels", 3), *size


def _pretrained(args) -> int:
    """`cnnlab models --pretrained`: the packaged weights, their test accuracy and how each was made."""
    from .packaged import list_packaged

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
        print(
            f"{e.name:<{width}}  {e.model:<9} {e.dataset:<14} {e.test_accuracy:>8.2%}  {e.bytes / 1e6:>5.2f}MB  "
            f"{e.epochs:g} epochs, {e.train_seconds / 60:,.0f} min on {e.cpu}, {e.threads} thread(s), "
            f"{e.precision}, torch {e.torch}{tta}"
        )
        print(f"{'':<{width}}  $ {e.command}")
    print(
        "(use a name wherever RUN_DIR|WEIGHTS is taken, e.g. 'cnnlab predict resnet20-cifar10 photo.jpg', or "
        "create_model('resnet20', weights='cifar10'); each file is checked against its sha256 when loaded)"
    )
    return 0


def models_command(args) -> int:
    """`cnnlab models [--pretrained] [--json]`."""
    import torch

    from . import create_model, list_models
    from .registry import model_entrypoint
    from .summary import summarize

    if args.pretrained:
        return _pretrained(args)
    rows = []
    for name in list_models():
        with torch.device("meta"):  # shapes, parameter counts and MACs need no memory and no arithmetic
            model = create_model(name)
        size = native_input(model)
        info = summarize(model, size)
        doc = (model_entrypoint(name).__doc__ or "").strip().splitlines()[0]
        rows.append(
            {"name": name, "params": info["params"], "macs": info["macs"], "input_size": list(size), "description": doc}
        )
    if args.json:
        print(json.dumps(rows))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'model':<{width}} {'params':>12} {'MACs':>14}  {'input':<9} description")
    for r in rows:
        print(
            f"{r['name']:<{width}} {r['params']:>12,} {r['macs']:>14,}  {'x'.join(map(str, r['input_size'])):<9} "
            f"{r['description']}"
        )
    print(
        "(MACs per image at the native input size; 1 MAC = 2 FLOPs; weights that come with cnnlab: "
        "cnnlab models --pretrained)"
    )
    return 0


def summary_command(args, model_args: dict) -> int:
    """`cnnlab summary MODEL ...`: layers, output shapes, parameters and MACs."""
    from . import create_model
    from .registry import accepts
    from .summary import format_summary, summarize

    kwargs = dict(model_args)
    if args.num_classes:
        kwargs["num_classes"] = args.num_classes
    if args.input_size:
        kwargs.setdefault("in_channels", args.input_size[0])
        kwargs.setdefault("input_size", list(args.input_size[1:]))
    # a model that adapts to any input size (global pooling) takes no input_size argument
    kwargs = {k: v for k, v in kwargs.items() if k not in ("in_channels", "input_size") or accepts(args.model, k)}
    if args.input_size:
        from .summary import check_input_size

        check_input_size(args.model, kwargs, args.input_size, what="--input-size")
    model = create_model(args.model, **kwargs)
    info = summarize(model, args.input_size or native_input(model))
    print(json.dumps(info) if args.json else format_summary(info, title=args.model))
    return 0
