"""The one scorer of a test split, used by training, `cnnlab eval` and the report: loss, accuracy, top-5,
per-class accuracy, the confusion matrix and, when asked, each image's loss and prediction.

In a distributed run each rank scores its own contiguous share of the split and the counts are summed,
so the accuracy equals the one-process figure for the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..training.runtime import Runtime, pick_channels_last, pick_device, pick_precision

__all__ = ["evaluate", "most_confused", "prepare_for_inference", "inference_runtime", "evaluate_target", "Evaluation"]


def inference_runtime(device: str | torch.device = "auto", precision: str = "fp32") -> Runtime:
    """The settings for inference: fp32 unless asked (the precision eval, predict and exported models agree in);
    "auto" picks by the same rules as training (one process)."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    prec, prec_why = pick_precision(precision, dev)
    cl, cl_why = pick_channels_last("auto", dev, prec)
    return Runtime(dev, prec, prec_why, cl, cl_why, torch.get_num_threads())


def prepare_for_inference(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Eval mode, on the runtime's device and memory format."""
    # Module.to takes memory_format at run time; its stub does not list it
    return model.eval().to(runtime.device, memory_format=runtime.memory_format)  # type: ignore[call-overload]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, num_classes: int, *, runtime: Runtime | None = None, per_image: bool = False, tta: int = 0
) -> dict:
    """Run `model` over every batch of `loader` (this rank's share in a distributed run).

    Returns n, loss, accuracy, top5 (with more than 5 classes), per_class and confusion (true class by row);
    with `per_image`, also `losses` and `preds`: one value per image of the whole split, in its order.
    `tta` > 0 averages the logits over mirrored (and, at 2, shifted) views (inference/tta.py).
    """
    from .tta import tta_logits

    runtime = runtime or Runtime(loader.device)
    was_training = model.training
    model.eval()
    device = loader.device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, top-5 hits
    losses, preds = [], []
    try:
        for x, y in loader:
            with runtime.autocast():
                logits = tta_logits(model, x, tta) if tta else model(x)
            logits = logits.float()
            loss = F.cross_entropy(logits, y, reduction="none")
            pred = logits.argmax(1)
            sums[0] += loss.double().sum()
            confusion += torch.bincount(y * num_classes + pred, minlength=num_classes**2).view(num_classes, -1)
            if num_classes > 5:
                sums[1] += (logits.topk(5, dim=1).indices == y[:, None]).any(1).sum()
            if per_image:
                losses.append(loss.cpu())
                preds.append(pred.cpu())
    finally:
        model.train(was_training)
    runtime.all_reduce(confusion)
    runtime.all_reduce(sums)
    confusion = confusion.cpu()
    n = int(confusion.sum())
    per_class_total = confusion.sum(1).clamp_min(1)
    result = {
        "n": n,
        "loss": sums[0].item() / max(n, 1),
        "accuracy": confusion.diag().sum().item() / max(n, 1),
        "per_class": (confusion.diag() / per_class_total).tolist(),
        "confusion": confusion.tolist(),
    }
    if num_classes > 5:
        result["top5"] = sums[1].item() / max(n, 1)
    if per_image:  # ranks hold consecutive shares, so rank order is the split's order
        shares = runtime.gather(
            (
                torch.cat(losses) if losses else torch.empty(0),
                torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64),
            )
        )
        result["losses"] = torch.cat([s[0] for s in shares])
        result["preds"] = torch.cat([s[1] for s in shares])
    return result


def most_confused(confusion: list[list[int]], classes: list[str], k: int = 5) -> list[dict]:
    """The k largest off-diagonal cells: how often class `true` was predicted as `predicted`."""
    pairs = [(count, t, p) for t, row in enumerate(confusion) for p, count in enumerate(row) if t != p and count]
    pairs.sort(reverse=True)
    return [{"true": classes[t], "predicted": classes[p], "count": c} for c, t, p in pairs[:k]]


@dataclass
class Evaluation:
    """`cnnlab eval`'s result: the scorer's figures, where they were written, and what training reported."""

    result: dict  # evaluate()'s, with per_class by name, most_confused, dataset, weights, classes, precision, tta
    out_dir: Path
    model: str = ""
    reported: float | None = None  # the test accuracy training (or the packaged registry) recorded
    reported_by: str = ""
    differences: list[str] = field(default_factory=list)  # why this evaluation may differ from the recorded one


def evaluate_target(
    target: str | Path,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    tta: int | None = None,
    out: str | Path | None = None,
    log=print,
) -> Evaluation:
    """Score a run folder, a weights file or packaged weights on a test split, with the model's own recorded
    preprocessing; writes eval.json (next to the weights, or ./eval/NAME for packaged weights, or `out`; the
    confusion matrix as a picture: viz.plots.plot_confusion). The run's data is found where it was
    (Run.data_dir), unless `dataset`/`data_dir` say otherwise."""
    import json

    from ..data.catalog import get_spec
    from ..errors import CnnlabError, DatasetError
    from ..files import save_atomic
    from ..models.packaged import get_packaged, is_packaged
    from ..run import RUN_FILES, Run, is_run_folder
    from .test_split import open_test_split
    from .weights import load_weights

    path = Path(target)
    run = Run(path) if is_run_folder(path) else None
    packaged = get_packaged(str(target)) if not path.exists() and is_packaged(str(target)) else None
    trained = run.summary if run else {}
    if packaged is not None:
        trained = {"test_accuracy": packaged.test_accuracy, "precision": packaged.precision, "test_tta": packaged.tta}
    tta = tta if tta is not None else int(trained.get("test_tta") or 0)
    runtime = inference_runtime(device, precision)
    loaded = load_weights(target, runtime.device)
    dataset = dataset or loaded.meta.get("dataset")
    if not dataset:
        raise CnnlabError(f"{target}: its sidecar names no dataset; give --dataset NAME (and --data-dir)")
    same_data = dataset == (run.config.dataset if run else packaged.dataset if packaged else None)
    if run and same_data:
        data_dir = run.data_dir(data_dir)
    try:
        split = open_test_split(
            dataset,
            data_dir,
            preprocess=loaded.preprocess,
            runtime=runtime,
            streamed=same_data and trained.get("data_mode") == "stream",
            workers=run.config.workers if run else 2,
            log=log,
        )
    except DatasetError as exc:
        where = (
            ""
            if data_dir
            else (
                f"; point cnnlab at the data with --data-dir DIR (or $CNNLAB_DATA), or {get_spec(dataset).how_to_get}"
            )
        )
        raise DatasetError(f"{exc}{where}") from None
    if len(split.classes) != len(loaded.classes):
        raise CnnlabError(
            f"{dataset} has {len(split.classes)} classes, but the model was trained on {len(loaded.classes)}"
        )
    # Module.to takes memory_format at run time; its stub does not list it
    model = loaded.model.to(runtime.device, memory_format=runtime.memory_format)  # type: ignore[call-overload]
    result = evaluate(model, split.loader, len(loaded.classes), runtime=runtime, tta=tta, per_image=True)
    preds = result.pop("preds")
    result.pop("losses")
    result["per_class"] = dict(zip(split.classes, result["per_class"]))
    result["most_confused"] = most_confused(result["confusion"], split.classes)
    result.update(
        {
            "dataset": dataset,
            "weights": str(loaded.path),
            "classes": split.classes,
            "precision": runtime.precision,
            "tta": tta,
            "preprocess": loaded.preprocess.to_dict(),
            "predictions": preds.tolist(),
        }
    )
    if split.files is not None:
        result["files"] = split.files
    # never into the installed package: packaged weights are evaluated into ./eval/NAME
    out_dir = Path(out) if out else Path("eval") / packaged.name if packaged else loaded.path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    save_atomic(json.dumps(result, indent=2).encode(), out_dir / RUN_FILES["eval"])
    evaluation = Evaluation(result, out_dir, model=loaded.meta["model"])
    if trained.get("test_accuracy") is not None and same_data:
        evaluation.reported = trained["test_accuracy"]
        evaluation.reported_by = "the registry of packaged weights lists" if packaged else "training reported"
        if abs(trained["test_accuracy"] - result["accuracy"]) >= 0.5 / max(result["n"], 1):
            if trained.get("precision") != runtime.precision:
                evaluation.differences.append(
                    f"training evaluated in {trained.get('precision')}, this in {runtime.precision}: the rounding "
                    "differs, so images near a decision boundary can flip"
                )
            if int(trained.get("test_tta") or 0) != tta:
                evaluation.differences.append(
                    f"training used test-time augmentation level {trained.get('test_tta') or 0}, this {tta}"
                )
    return evaluation
