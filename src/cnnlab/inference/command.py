"""`cnnlab eval`, `predict` and `export`: their flags and the library calls behind them (the CLI only
dispatches here)."""

from __future__ import annotations

import json
import sys

from ..errors import CnnlabError, ConfigError

__all__ = ["add_infer_parsers", "eval_command", "predict_command", "export_command"]


def add_infer_parsers(sub) -> None:
    """The parsers of `cnnlab eval`, `predict` and `export`."""
    from .export import DEFAULT_OPSET, DEFAULT_TOLERANCE, FORMATS

    p = sub.add_parser("eval", help="evaluate trained weights on a test split")
    p.add_argument("target", metavar="RUN_DIR|WEIGHTS")
    p.add_argument("--dataset", help="dataset (default: the one the model was trained on)")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="folder for eval.json and confusion.png (default: next to the weights)")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        default="fp32",
        help="fp32 (default, as predict and an exported model); bf16; auto: as training decides",
    )
    p.add_argument(
        "--tta",
        type=int,
        choices=(0, 1, 2),
        help="test-time augmentation: 0 none, 1 mirror, 2 mirror and "
        "1-pixel shifts (default: what the run's final evaluation used)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("predict", help="classify image files or folders of images")
    p.add_argument("target", metavar="RUN_DIR|WEIGHTS")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument(
        "--model",
        help="model name for a plain state-dict file without a sidecar (e.g. torchvision's "
        "resnet50 .pth; preprocessing is then ImageNet's resize 256, centre crop 224)",
    )
    p.add_argument("--classes", help="text file of class names, one per line, in output order")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        default="fp32",
        help="fp32 (default: what 'cnnlab eval' and an exported model compute in); bf16; auto: bf16 only "
        "where a probe measures it clearly faster here (as training decides)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "export",
        help="write a model as ONNX or a torch.export program, checked against PyTorch",
        description="Export a run's weights as ONNX (onnxruntime, TensorRT, browsers) or as a "
        "torch.export program (.pt2). The file takes float32 N x C x H x W pixels in [0, 1] "
        "with any batch size and returns logits; the training normalisation is inside it. "
        "It is run on test images (or random inputs) and written only if its logits match "
        "PyTorch's within --tolerance.",
    )
    p.add_argument("target", metavar="RUN_DIR|WEIGHTS")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--out", metavar="FILE", help="default: next to the weights, model.onnx or model.pt2")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="largest |logit difference| allowed, "
        f"as a fraction of max(1, max |logit|) (default {DEFAULT_TOLERANCE:g}); a difference within 4x "
        "PyTorch's own fp32 error against float64 passes too",
    )
    p.add_argument("--data-dir", help="where the run's dataset is, for the check (default: where the run found it)")
    p.add_argument("--model", help="model name for a plain state-dict file without a sidecar")
    p.add_argument("--classes", help="text file of class names, one per line, in output order")


def eval_command(args) -> int:
    from ..run import RUN_FILES
    from ..viz.plots import plot_confusion
    from .evaluate import evaluate_target

    ev = evaluate_target(
        args.target,
        dataset=args.dataset,
        data_dir=args.data_dir,
        device=args.device,
        precision=args.precision,
        tta=args.tta,
        out=args.out,
        log=lambda m: print(m, file=sys.stderr),
    )
    result = ev.result
    plot_confusion(
        result["confusion"],
        result["classes"],
        ev.out_dir / RUN_FILES["confusion"],
        title=f"{ev.model} on {result['dataset']} test: accuracy {result['accuracy']:.2%}",
    )
    if args.json:
        print(json.dumps(result))
        return 0
    tta = result["tta"]
    print(
        f"{result['dataset']} test split, {result['n']:,} images: accuracy {result['accuracy']:.4f}, loss "
        f"{result['loss']:.4f}"
        + (f", top-5 {result['top5']:.4f}" if "top5" in result else "")
        + f" ({result['precision']}{f', test-time augmentation level {tta}' if tta else ''})"
    )
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


def predict_command(args) -> int:
    from ..training.runtime import pick_device
    from .predict import expand_inputs, predict_files
    from .weights import load_weights

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


def export_command(args) -> int:
    from .export import FP32_ERROR_FACTOR, export_model
    from .weights import load_weights

    loaded = load_weights(args.target, "cpu", model_name=args.model, classes_file=args.classes)
    r = export_model(loaded, args.out, args.format, opset=args.opset, tolerance=args.tolerance, data_dir=args.data_dir)
    c, h, w = loaded.input_shape
    kind = f"ONNX opset {r.opset}" if r.format == "onnx" else "torch.export program"
    print(
        f"{r.path}: {loaded.meta['model']} as {kind}, {r.bytes / 2**20:.1f} MiB; input float32 N x {c} x {h} x {w} "
        f"in [0, 1] (normalisation inside), output logits over {len(loaded.classes)} classes"
    )
    print(
        f"checked against PyTorch (fp32, eval) on {r.inputs} at batch {r.batch_sizes[0]} and {r.batch_sizes[1]}: "
        f"max |logit difference| {r.max_abs_diff:.2g} (allowed {r.tolerance:g} x max |logit| {r.logit_scale:.3g}), "
        f"top-1 agreement {r.top1_agree}/{r.top1_total}"
    )
    if r.fp32_error is not None:
        print(
            f"(above the tolerance, but within {FP32_ERROR_FACTOR} x PyTorch's own fp32 error against float64, "
            f"{r.fp32_error:.2g}: this network amplifies rounding, and the export is as exact as PyTorch itself)"
        )
    if r.metadata_path:
        print(f"metadata: {r.metadata_path}")
    return 0
