"""Export trained weights as ONNX or as a `torch.export` program (.pt2), checked against PyTorch before writing.

The exported model takes float32 (N, C, H, W) pixels in [0, 1] with any batch size, applies the training
normalisation itself and returns logits. Both formats come from one `torch.export` capture; ONNX is translated
from it by PyTorch's dynamo-based exporter (onnxscript), because the older TorchScript exporter is deprecated
and cannot export AlexNet's adaptive pooling at input sizes other than 224x224.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .._version import __version__
from ..errors import CnnlabError
from ..files import save_atomic
from .weights import LoadedModel

__all__ = [
    "FORMATS",
    "DEFAULT_OPSET",
    "DEFAULT_TOLERANCE",
    "ExportError",
    "ExportReport",
    "WithNormalisation",
    "capture",
    "onnx_bytes",
    "pt2_bytes",
    "export_metadata",
    "run_onnx",
    "run_pt2",
    "check_exported",
    "check_inputs",
    "pytorch_fp32_error",
    "export_model",
    "compare_with_predict",
]

FORMATS = ("onnx", "pt2")
DEFAULT_OPSET = 18  # the opset PyTorch 2.13's exporter writes natively; onnxruntime >= 1.14 runs it
# Max |logit difference| allowed, as a fraction of max(1, max |logit|), so that one number fits logits of 2 and of
# 1e4 (deep ResNets with random weights). fp32 kernels that sum in another order (onnxruntime's MLAS, PyTorch's
# oneDNN) put 22 of the 23 registered models at 1.1e-6 or less on this scale; a real export fault (the normalisation
# left out, as test_export checks) moves logits by more than 1e-2: 1e-4 has about 100x margin on either side.
DEFAULT_TOLERANCE = 1e-4
# An ill-conditioned network amplifies rounding: a random plain110 computed by PyTorch itself in fp32 is 5e-4
# (relative) away from float64. Above the tolerance, a difference within this many times PyTorch's own fp32 error
# (against float64, on a few inputs) is still accepted: the export is then as exact as PyTorch is.
FP32_ERROR_FACTOR = 4
_FP64_INPUTS = 8
CHECK_IMAGES = 64
_ONNX_EXTRA = "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'cnnlab[onnx]'"


class ExportError(CnnlabError):
    """An export that failed, or whose result does not compute what the PyTorch model computes."""


class WithNormalisation(nn.Module):
    """float (N, C, H, W) in [0, 1] -> (x - mean) / std -> the wrapped model's logits: predict's preprocessing
    from the uint8 stage on, inside the graph."""

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        shape = (1, len(mean), 1, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


@dataclass
class ExportReport:
    """What `export_model` wrote and how closely the written model matches PyTorch's."""

    path: Path
    format: str
    opset: int | None  # ONNX only
    metadata_path: Path | None
    bytes: int
    inputs: str  # where the check inputs came from, in words
    batch_sizes: tuple[int, ...]
    max_abs_diff: float  # max |logit difference| over every checked batch
    logit_scale: float  # max(1, max |logit|): the tolerance is relative to this
    tolerance: float
    fp32_error: float | None  # PyTorch's own fp32 error against float64, measured only when the tolerance is exceeded
    top1_agree: int
    top1_total: int
    seconds: float


def _reference(loaded: LoadedModel) -> WithNormalisation:
    """The model in eval mode, fp32 and on the CPU (a copy where it is elsewhere): the exported file is a CPU
    float32 program."""
    model = loaded.model
    on_cpu_fp32 = all(
        t.device.type == "cpu" and t.dtype == torch.float32
        for t in model.state_dict().values()
        if t.is_floating_point()
    )
    if not on_cpu_fp32:
        model = copy.deepcopy(model).to("cpu", torch.float32)
    return WithNormalisation(model, loaded.mean, loaded.std).eval()


@contextlib.contextmanager
def _quiet():
    """The exporters report progress, deprecations and skipped torchvision ops on stdout and the log: none of it
    is the user's concern when the result is checked numerically afterwards."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def capture(model: nn.Module, input_shape: tuple[int, int, int]) -> torch.export.ExportedProgram:
    """Trace `model` (already wrapped, in eval mode) with a dynamic batch axis: one graph for batch 1 to any N."""
    example = torch.rand(2, *input_shape)  # batch 2: torch.export would fix a batch of 1 as a constant
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet(), torch.no_grad():
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # any tracing failure means the same to the user: this model cannot be exported
        raise ExportError(
            f"torch.export cannot trace this model at input {list(input_shape)} "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def export_metadata(loaded: LoadedModel) -> dict:
    """What a consumer of the exported file needs to feed it and read its output."""
    c, h, w = loaded.input_shape
    meta = {
        "model": loaded.meta["model"],
        "classes": list(loaded.classes),
        "input_shape": [c, h, w],
        "mean": list(loaded.mean),
        "std": list(loaded.std),
        "cnnlab_version": __version__,
        "input": f"float32 N x {c} x {h} x {w}, pixels scaled to [0, 1]; the normalisation is inside the model",
        "output": f"logits, N x {len(loaded.classes)}",
        # what the graph cannot do (decoding a file, resizing, cropping): the steps cnnlab predict takes first
        "preprocess": loaded.preprocess.to_dict(),
        "preprocess_outside_the_graph": f"{loaded.preprocess.describe().rsplit(', mean', 1)[0]}; then / 255",
    }
    if loaded.preprocess.resize == "shorter":
        meta["resize"] = loaded.preprocess.resize_to  # shorter side scaled to this, then the centre cropped to H x W
    return meta


def _require_onnx() -> None:
    """Fail before minutes of tracing when a package of the `onnx` extra is missing; one line names the extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  torch.onnx's exporter imports it itself, with a less helpful message
    except ImportError:
        raise ExportError(_ONNX_EXTRA) from None


def onnx_bytes(program: torch.export.ExportedProgram, metadata: dict, opset: int = DEFAULT_OPSET) -> bytes:
    """Translate a captured program to a serialised ONNX model with `metadata` in its metadata_props."""
    _require_onnx()
    try:
        with _quiet():
            onnx_program = torch.onnx.export(
                program,
                dynamo=True,
                opset_version=opset,
                input_names=["images"],
                output_names=["logits"],
                optimize=True,
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001  exporter failures have many types; the message is what helps
        raise ExportError(
            f"the ONNX exporter failed at opset {opset} ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    assert onnx_program is not None  # dynamo=True returns the program
    proto = onnx_program.model_proto
    written = next((i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")), None)
    if written != opset:  # the exporter logs a failed conversion and carries on at its own opset
        raise ExportError(
            f"--opset {opset}: the ONNX exporter cannot convert this model to that opset (it stays at "
            f"{written}); use the default {DEFAULT_OPSET} or another opset"
        )
    _name_batch_axis(proto)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    proto.doc_string = f"cnnlab {__version__}: {metadata['model']}; {metadata['input']}; returns {metadata['output']}"
    try:
        return proto.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GiB limit: no registered model comes near it
        raise ExportError(f"the ONNX model cannot be serialised as one file ({exc})") from None


def _name_batch_axis(proto) -> None:
    """torch.export names the dynamic axis after a symbol (s77): call it 'batch' wherever it appears."""
    symbol = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol:
        return
    for info in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"


def pt2_bytes(program: torch.export.ExportedProgram, metadata: dict) -> bytes:
    """Serialise a captured program as a .pt2 archive, with `metadata` inside it as cnnlab.json as well."""
    buffer = io.BytesIO()
    with _quiet():
        torch.export.save(program, buffer, extra_files={"cnnlab.json": json.dumps(metadata)})
    return buffer.getvalue()


def run_onnx(data: bytes, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """An onnxruntime CPU session over a serialised model: float32 (N, C, H, W) -> logits."""
    _require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001  e.g. an opset newer than this onnxruntime knows
        raise ExportError(
            f"onnxruntime {ort.__version__} cannot load the exported model ({_first_line(exc)})"
        ) from None
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def run_pt2(data: bytes) -> Callable[[np.ndarray], np.ndarray]:
    """The program in .pt2 bytes that `pt2_bytes` just made, loaded back with `torch.export.load`. Only for our
    own bytes: torch.export.load may unpickle with weights_only=False, so a .pt2 from elsewhere is never loaded."""
    with _quiet():
        module = torch.export.load(io.BytesIO(data)).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run


def check_inputs(
    loaded: LoadedModel, data_dir: str | Path | None = None, n: int = CHECK_IMAGES, seed: int = 0
) -> tuple[torch.Tensor, str]:
    """The first `n` test images of the run's dataset in [0, 1], or uniform noise where that dataset cannot be
    found or has another shape; and where they came from, in words."""
    name = loaded.meta.get("dataset")
    if name:
        from ..data import load_dataset

        if data_dir is None:  # a run folder's config says where the data was found
            data_dir = _run_data_dir(loaded.path.parent)
        try:
            data = load_dataset(name, data_dir, log=lambda m: None)
        except CnnlabError:
            data = None
        if data is not None and len(data.test_images) and tuple(data.test_images.shape[1:]) == loaded.input_shape:
            images = data.test_images[:n].float() / 255
            return images, f"{len(images)} test images of {name}"
    generator = torch.Generator().manual_seed(seed)
    why = f"{name} not found" if name else "no dataset named in the sidecar"
    return torch.rand(n, *loaded.input_shape, generator=generator), f"{n} random inputs ({why})"


def _run_data_dir(folder: Path) -> str | None:
    """Where a run folder's data was (Run.data_dir), or None for a weights file outside a run."""
    from ..run import Run, is_run_folder

    if not is_run_folder(folder):
        return None
    try:
        return Run(folder).data_dir()
    except CnnlabError:
        return None


def check_exported(
    reference: nn.Module, run: Callable[[np.ndarray], np.ndarray], inputs: torch.Tensor, single: int = 4
) -> dict:
    """Logits of the exported model against `reference` on `inputs` as one batch, then on the first `single`
    inputs one at a time (the dynamic batch axis at both ends)."""
    with torch.no_grad():
        want = reference(inputs).numpy()
    if not np.isfinite(want).all():
        raise ExportError(
            "the PyTorch model's own logits are not finite on the check inputs: the weights are "
            "broken, not the export; nothing to compare against"
        )
    got_batch = run(inputs.numpy())
    got_single = np.concatenate([run(inputs[i : i + 1].numpy()) for i in range(min(single, len(inputs)))])
    if got_batch.shape != want.shape:
        raise ExportError(
            f"the exported model returns {got_batch.shape} for a batch of {tuple(inputs.shape)}; "
            f"PyTorch returns {want.shape}"
        )
    diff = max(float(np.abs(got_batch - want).max()), float(np.abs(got_single - want[: len(got_single)]).max()))
    return {
        "max_abs_diff": diff,
        "logit_scale": max(1.0, float(np.abs(want).max())),
        "top1_agree": int((got_batch.argmax(1) == want.argmax(1)).sum()),
        "top1_total": len(want),
        "batch_sizes": (len(inputs), 1),
    }


def pytorch_fp32_error(reference: nn.Module, inputs: torch.Tensor) -> float:
    """Max |logit difference| between `reference` in fp32 and in float64 on `inputs`: the rounding error PyTorch
    itself makes, below which no fp32 runtime can be expected to agree with it."""
    with torch.no_grad():
        fp32 = reference(inputs).double()
        fp64 = copy.deepcopy(reference).double()(inputs.double())
    return float((fp32 - fp64).abs().max())


def export_model(
    loaded: LoadedModel,
    out: str | Path | None = None,
    fmt: str = "onnx",
    *,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
    data_dir: str | Path | None = None,
    inputs: torch.Tensor | None = None,
) -> ExportReport:
    """Export, run the result on test images (or noise) against the PyTorch model, and write it only if its
    logits agree within `tolerance` x max(1, max |logit|) or within FP32_ERROR_FACTOR x PyTorch's own fp32
    error; otherwise ExportError and nothing is written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    if not (tolerance > 0):
        raise ExportError(f"--tolerance {tolerance}: must be a positive number")
    start = time.perf_counter()
    out = Path(out) if out is not None else loaded.path.with_suffix(f".{fmt}")
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give the file to write, e.g. {out / ('model.' + fmt)}")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: no such folder for {out.name}")
    if fmt == "onnx":
        _require_onnx()
    reference = _reference(loaded)
    metadata = export_metadata(loaded)
    program = capture(reference, loaded.input_shape)
    if fmt == "onnx":
        data = onnx_bytes(program, metadata, opset)
        run = run_onnx(data)
    else:
        data = pt2_bytes(program, metadata)
        run = run_pt2(data)
    if inputs is None:
        inputs, source = check_inputs(loaded, data_dir)
    else:
        source = f"{len(inputs)} given inputs"
    result = check_exported(reference, run, inputs)
    allowed, fp32_error = tolerance * result["logit_scale"], None
    if not result["max_abs_diff"] <= allowed:  # also refuses NaN
        fp32_error = pytorch_fp32_error(reference, inputs[:_FP64_INPUTS])
        if not result["max_abs_diff"] <= FP32_ERROR_FACTOR * fp32_error:
            raise ExportError(
                f"{out} not written: the exported {fmt} model's logits differ from PyTorch's by up to "
                f"{result['max_abs_diff']:.3g} on {source}, above the tolerance {tolerance:g} x "
                f"{result['logit_scale']:.3g} = {allowed:.3g} and above {FP32_ERROR_FACTOR} x PyTorch's own fp32 "
                f"error against float64 ({fp32_error:.3g}) (top-1 agreement "
                f"{result['top1_agree']}/{result['top1_total']}); "
                "report it with the model name, or raise --tolerance if the difference is acceptable"
            )
    metadata_path = None
    if fmt == "pt2":  # the archive also holds cnnlab.json; the file beside it is for readers without torch
        metadata_path = out.with_name(out.name + ".json")
        save_atomic(json.dumps(metadata, indent=2).encode(), metadata_path)
    try:
        save_atomic(data, out)
    except BaseException:
        if metadata_path is not None:
            metadata_path.unlink(missing_ok=True)
        raise
    return ExportReport(
        path=out,
        format=fmt,
        opset=opset if fmt == "onnx" else None,
        metadata_path=metadata_path,
        bytes=len(data),
        inputs=source,
        tolerance=tolerance,
        fp32_error=fp32_error,
        seconds=time.perf_counter() - start,
        **result,
    )


def compare_with_predict(
    onnx_path: str | Path,
    loaded: LoadedModel,
    image_paths: Iterable[str | Path],
    predictions: list[dict] | None = None,
    batch_sizes: tuple[int, ...] = (1, 64),
    precision: str = "fp32",
) -> dict:
    """Classify `image_paths` with an exported ONNX file and with `cnnlab predict` (its JSON results as
    `predictions`, or predict_files run here) and return the largest probability difference and the top-1
    agreement for each batch size; images are repeated to fill a batch. `precision` is the one predict ran
    (or runs) at: bf16 autocast agrees to about three digits, fp32 to about seven."""
    from ..training.runtime import pick_precision
    from .predict import load_image, predict_files

    precision, _ = pick_precision(precision, next(loaded.model.parameters()).device)
    paths = [Path(p) for p in image_paths]
    if predictions is None:
        predictions, _ = predict_files(loaded, paths, top_k=len(loaded.classes), precision=precision)
    by_file = {str(r["file"]): r for r in predictions}
    known = [p for p in paths if str(p) in by_file]
    if not known:
        raise ExportError("none of the images were classified by predict: nothing to compare")
    pixels = np.stack([load_image(p, loaded.preprocess)[0] for p in known])
    images = pixels.astype(np.float32) / 255
    run = run_onnx(Path(onnx_path).read_bytes())
    report: dict[str, Any] = {"images": len(known), "predict_precision": precision, "batches": {}}
    for batch in batch_sizes:
        reps = -(-max(batch, len(images)) // len(images))
        tiled = np.concatenate([images] * reps)
        logits = np.concatenate([run(tiled[i : i + batch]) for i in range(0, len(tiled), batch)])[: len(images)]
        probs = torch.from_numpy(logits).double().softmax(1).numpy()
        worst, agree = 0.0, 0
        for path, p in zip(known, probs):
            top = by_file[str(path)]["top"]
            worst = max(worst, max(abs(float(p[t["index"]]) - t["probability"]) for t in top))
            agree += int(p.argmax() == top[0]["index"])
        report["batches"][batch] = {"max_prob_diff": worst, "top1_agree": agree}
    return report
