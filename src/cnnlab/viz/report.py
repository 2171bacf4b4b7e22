"""`cnnlab report RUN_DIR`: one self-contained HTML page on how a run went and what the model learned.

Every image is embedded as a data: URI and nothing is fetched from the network, so the page can be
mailed, archived or opened offline. A small inline script records load errors and undecodable images
in the page's <body> attributes, which the browser test reads.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from ..errors import CheckpointError, ConfigError
from ..files import save_atomic
from ..run import Run, is_run_folder
from .figure import OKABE_ITO, finish, subplots
from .plots import plot_confusion, plot_predictions

__all__ = ["build_report", "plot_curves", "plot_step_losses", "run_evaluation", "hardest_examples"]


def plot_curves(rows: list[dict], path: str | Path | None = None) -> Figure:
    """Loss, accuracy (train and test) and learning rate by epoch."""
    epochs = [r["epoch"] for r in rows]
    fig, axes = subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    colours = {"train": OKABE_ITO["blue"], "test": OKABE_ITO["vermillion"]}  # told apart with any colour vision
    for ax, metric, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        for split in ("train", "test"):
            points = [
                (e, r[f"{split}_{metric}"]) for e, r in zip(epochs, rows) if r.get(f"{split}_{metric}") is not None
            ]
            if points:
                ax.plot(*zip(*points), marker="o", color=colours[split], label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title("Loss (train: running mean with label smoothing)", fontsize=10)
    axes[1].set_title("Accuracy (fraction correct)")
    axes[2].plot(epochs, [r["lr"] for r in rows], marker="o", color=OKABE_ITO["bluish green"])
    axes[2].set_title("Learning rate at the end of each epoch")
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("learning rate")
    axes[2].grid(alpha=0.3)
    return finish(fig, path)


def plot_step_losses(
    losses: dict[str, Sequence[float]], window: int = 20, title: str = "", path: str | Path | None = None
) -> Figure:
    """Training loss at every step, one line per run (e.g. recorded by a `fit` callback): the mean over the last
    `window` steps drawn solid, the steps themselves faint."""
    if not losses or window < 1:
        raise ConfigError(
            f"plot_step_losses needs at least one run's losses and window >= 1; got {len(losses)} runs, window {window}"
        )
    fig, ax = subplots(figsize=(8, 4.2), layout="constrained")
    colours = [OKABE_ITO[c] for c in ("blue", "vermillion", "bluish green", "reddish purple", "orange", "sky blue")]
    values: Sequence[float] | np.ndarray
    for i, (label, values) in enumerate(losses.items()):
        values = np.asarray(values, dtype=np.float64)
        colour = colours[i % len(colours)]
        steps = np.arange(1, len(values) + 1)
        ax.plot(steps, values, color=colour, alpha=0.2, lw=0.8)
        sums = np.cumsum(np.insert(values, 0, 0.0))
        k = np.minimum(steps, window)  # the first steps average over what there is so far
        ax.plot(steps, (sums[steps] - sums[steps - k]) / k, color=colour, lw=2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or f"Training loss per step (solid: mean of the last {window} steps)", fontsize=10)
    return finish(fig, path)


def run_evaluation(run: Run, loaded, split, summary: dict) -> dict:
    """The run's own final evaluation (summary.json and predictions.safetensors, written by training), so the
    page shows the very figures training reported; scored again with the same scorer only when they are
    missing (a run made by an older cnnlab, or streamed shards) or belong to other data. `split`: a TestSplit."""
    from safetensors.torch import load_file

    predictions = run.file("predictions")
    if predictions.is_file() and "test_confusion" in summary and split.labels is not None:
        saved = load_file(predictions)
        if torch.equal(saved["labels"], split.labels):
            return {
                "n": len(saved["labels"]),
                "loss": summary["test_loss"],
                "accuracy": summary["test_accuracy"],
                "per_class": summary["test_per_class"],
                "confusion": summary["test_confusion"],
                "losses": saved["losses"],
                "preds": saved["preds"],
                "source": "the run's own evaluation",
            }
    from ..inference.evaluate import evaluate

    model = loaded.model.to(
        split.loader.device,
        memory_format=torch.channels_last if split.loader.channels_last else torch.contiguous_format,
    )
    tta = int(summary.get("test_tta") or 0)
    result = evaluate(model, split.loader, len(loaded.classes), runtime=split.runtime, per_image=True, tta=tta)
    return {**result, "source": f"scored again ({split.runtime.precision}{f', TTA {tta}' if tta else ''})"}


def hardest_examples(result: dict, k: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices, losses and predictions of the `k` test images with the highest loss."""
    top = result["losses"].topk(min(k, len(result["losses"]))).indices
    return top, result["losses"][top], result["preds"][top]


def _plot_hardest(split, top, losses, preds, classes, path: Path) -> Figure:
    images = [torch.from_numpy(np.ascontiguousarray(split.image(i))).permute(2, 0, 1) for i in top.tolist()]
    return plot_predictions(
        images, split.labels[top], preds, classes, losses, title="Test images with the highest loss", path=path
    )


_CHECK_SCRIPT = """
<script>
// Records what went wrong while loading, for a reader with developer tools closed and for the browser test.
var cnnlabErrors = [];
window.addEventListener('error', function (e) {
  cnnlabErrors.push(e.message || ('failed to load ' + (e.target && (e.target.src || e.target.href))));
}, true);
window.addEventListener('load', function () {
  var images = document.images, decoded = 0;
  for (var i = 0; i < images.length; i++) { if (images[i].complete && images[i].naturalWidth > 0) decoded++; }
  document.body.setAttribute('data-images', decoded + '/' + images.length);
  document.body.setAttribute('data-errors', String(cnnlabErrors.length));
});
</script>"""

_STYLE = """<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; }
</style>"""


def _img(png: Path, alt: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _cell(value) -> str:
    """A table cell's text: floats to 4 significant digits (11.962228814 s -> 11.96; 0.000123456 -> 0.0001235),
    without an exponent up to 10,000 and with thousands separators above."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _lr_find_section(run: Run, trained_lr: float) -> str:
    from ..training.lr_find import RULES

    found = json.loads(run.file("lr_find").read_text())
    rule = found.get("rule", "")
    others = ", ".join(f"{name} rule {found[name]:.3g}" for name in RULES if found.get(name) is not None)
    stop = f"; stopped early: {html.escape(found['stop_reason'])}" if found.get("stopped_early") else ""
    return (
        "<h2>Learning-rate finder</h2>"
        f"<p>{len(found.get('lrs', []))} of {found.get('steps')} steps, lr {found.get('start_lr', 0):.3g} rising "
        f"exponentially{stop}. Suggested lr <b>{found['suggestion']:.3g}</b> by the "
        f"{html.escape(RULES.get(rule, rule))} ({others}); this run trained with lr {trained_lr:.3g}.</p>"
        + _img(run.file("lr_find_plot"), "smoothed loss against learning rate")
    )


def build_report(run_dir: str | Path, data_dir: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Write RUN_DIR/report.html (and the figures it embeds, under RUN_DIR/report/); returns the page's path."""
    from ..inference.evaluate import most_confused
    from ..models.summary import summarize
    from .filters import layer_weight, plot_filters

    run = Run(run_dir)
    if not is_run_folder(run.path):
        raise CheckpointError(f"{run.path}: not a run folder (no config.yaml); give the folder 'cnnlab train' made")
    cfg, loaded, summary, rows = run.config, run.weights, run.summary, run.metrics
    figures = run.file("report_figures")
    figures.mkdir(exist_ok=True)
    classes, model = loaded.classes, loaded.model.eval()
    sections = []

    # configuration and environment
    env_rows = [[k, v] for k, v in summary.get("versions", {}).items()]
    env_rows += [[k, summary[k]] for k in ("device", "precision", "threads", "seed", "wall_seconds") if k in summary]
    sections.append(
        "<h2>Configuration and environment</h2>"
        + _table(["what", "value"], env_rows)
        + f"<pre>{html.escape(run.file('config').read_text())}</pre>"
    )

    # model summary
    info = summarize(model, tuple(loaded.input_shape))
    layer_rows = [
        [
            layer["name"],
            layer["type"],
            "x".join(map(str, layer["output_shape"])),
            f"{layer['params']:,}",
            f"{layer['macs']:,}",
        ]
        for layer in info["layers"]
    ]
    sections.append(
        f"<h2>Model: {html.escape(loaded.meta['model'])}</h2><p>{info['params']:,} parameters, "
        f"{info['macs']:,} multiply-accumulates per {'x'.join(map(str, loaded.input_shape))} image "
        f"<span class='note'>({html.escape(info['mac_note'])})</span></p>"
        + _table(["layer", "type", "output shape", "parameters", "MACs"], layer_rows)
    )

    # training curves
    if rows:
        plot_curves(rows, figures / "curves.png")
        sections.append("<h2>Training curves</h2>" + _img(figures / "curves.png", "training curves"))

    # the learning-rate finder (train --lr find, or cnnlab lr-find RUN_DIR)
    if run.file("lr_find").is_file() and run.file("lr_find_plot").is_file():
        sections.append(_lr_find_section(run, cfg.lr))

    # evaluation on the test split
    from ..inference.evaluate import inference_runtime
    from ..inference.test_split import open_test_split

    runtime = inference_runtime("cpu")  # fp32, as eval and predict score
    split = open_test_split(
        cfg.dataset,
        run.data_dir(data_dir),
        preprocess=loaded.preprocess,
        runtime=runtime,
        streamed=run.data_mode == "stream",
        workers=cfg.workers,
        log=log,
    )
    result = run_evaluation(run, loaded, split, summary)
    plot_confusion(
        result["confusion"],
        classes,
        figures / "confusion.png",
        title=f"Test confusion matrix: accuracy {result['accuracy']:.2%}",
    )
    per_class = [
        [name, f"{acc:.2%}", sum(result["confusion"][i])]
        for i, (name, acc) in enumerate(zip(classes, result["per_class"]))
    ]
    confused = [[p["true"], p["predicted"], p["count"]] for p in most_confused(result["confusion"], classes)]
    top, losses, preds = hardest_examples(result)
    hardest = ""
    if split.labels is not None and len(split.labels) == len(result["losses"]):
        _plot_hardest(split, top, losses, preds, classes, figures / "hardest.png")
        hardest = "<h3>Highest-loss test images</h3>" + _img(figures / "hardest.png", "highest-loss images")
    sections.append(
        f"<h2>Test results</h2><p>{result['n']:,} test images: accuracy <b>{result['accuracy']:.2%}</b>, "
        f"loss {result['loss']:.4f} <span class='note'>({result['source']})</span></p>"
        + _img(figures / "confusion.png", "confusion matrix")
        + "<h3>Per-class accuracy</h3>"
        + _table(["class", "accuracy", "images"], per_class)
        + "<h3>Most confused pairs</h3>"
        + _table(["true", "predicted", "count"], confused)
        + hardest
    )

    # what the first layer learned
    name, weight = layer_weight(model)
    plot_filters(weight, figures / "filters.png", layer=name)
    learned = f"<h2>First-layer filters ({html.escape(name)})</h2>" + _img(figures / "filters.png", "filters")
    kh, kw = weight.shape[2:]
    if min(kh, kw) >= 5:
        from .gabor import analyze_filters, format_gabor_summary

        gabor = analyze_filters(weight, figures)
        learned += (
            "<h3>Compared with macaque V1 simple cells (Ringach 2002)</h3>"
            f"<pre>{html.escape(format_gabor_summary(gabor))}</pre>"
            + _img(figures / "v1_comparison.png", "V1 comparison")
            + _img(figures / "gabor_fits.png", "fits")
        )
    else:
        learned += (
            f"<p class='note'>No V1 comparison: Gabor fits need filters of about 5x5 or larger, and these are "
            f"{kh}x{kw}. Train a model with a large first layer, e.g. <code>--model resnet18</code> (7x7) or "
            "<code>--model cnn --model-arg spec=c64k11s2,p,c128,p,f256</code> (11x11).</p>"
        )
    sections.append(learned)

    title = f"{loaded.meta['model']} on {cfg.dataset}"
    accuracy = summary.get("test_accuracy", result["accuracy"])
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>cnnlab: {html.escape(title)}</title>"
        f"{_STYLE}{_CHECK_SCRIPT}</head><body><h1>{html.escape(title)}</h1>"
        f"<p>Run folder <code>{html.escape(str(run.path))}</code>: test accuracy {accuracy:.2%} after "
        f"{summary.get('epochs', len(rows))} epochs.</p>" + "".join(sections) + "</body></html>"
    )
    path = run.file("report")
    save_atomic(page.encode(), path)
    return path
