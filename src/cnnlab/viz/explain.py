"""`cnnlab explain`: the student's own trained network on their images, layer by layer, in the manner of CNN
Explainer (Wang et al., IEEE VIS 2020), with Grad-CAM (Selvaraju et al. 2017), as one self-contained page.

Every number the page shows was computed here by PyTorch, in one forward pass of the batch with hooks on every
layer, and embedded as float32: the maps, the weights, the probabilities. Before anything is written, each
convolution, pooling, batch norm and activation is recomputed with `torch.nn.functional` from the input the
layer really received and compared with what it gave; a layer that does not agree (a custom module) is shown
without its arithmetic. The page's script multiplies window by kernel to show the products and reports any sum
that differs from the stored output (in <html data-mismatches>). Sequential nets are shown layer by layer;
residual blocks (modules with a `downsample` attribute, as torchvision's) as one column each that opens into
its layers, with the shortcut drawn.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..files import save_atomic
from .gradcam import _no_inplace, default_cam_layer, grad_cams, overlay, png_data_uri

__all__ = ["DEFAULT_BUDGET", "explain_data", "explain_html", "write_explain_page", "trace_model", "Node"]

DEFAULT_BUDGET = 5_000_000  # bytes per page: 8 CIFAR-10 images through the lecture's convnet take 2.2 MB
_ACTIVATIONS = {
    nn.ReLU: "ReLU",
    nn.GELU: "GELU",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.ELU: "ELU",
    nn.LeakyReLU: "leaky ReLU",
    nn.SiLU: "SiLU",
    nn.ReLU6: "ReLU6",
}
_SKIPPED = (nn.Flatten, nn.Dropout, nn.Identity)  # shape bookkeeping, or nothing at all in eval mode
_MAX_UNITS = 256  # units shown of a dense layer (AlexNet's have 4,096)
_TOP_PRODUCTS = 8  # a dense unit's largest input x weight products, the rest summed
_MAX_CAM_CLASSES = 10  # Grad-CAM for every class up to this many; beyond, each image's 5 most probable


@dataclass
class Node:
    """One call of a module in the forward pass: its input and output for the whole batch."""

    name: str
    module: nn.Module
    x: torch.Tensor
    out: torch.Tensor
    parent: str | None = None  # the residual block it belongs to
    children: list[str] = field(default_factory=list)  # a block's calls, in order


def _is_block(module: nn.Module) -> bool:
    return hasattr(module, "downsample") and any(isinstance(m, nn.Conv2d) for m in module.modules())


def trace_model(model: nn.Module, x: torch.Tensor) -> tuple[list[Node], torch.Tensor]:
    """Every leaf module's call (a module called twice, as a block's ReLU, gives `name` and `name#2`) and every
    residual block's, in the order they finish, with their input and output; and the logits."""
    nodes: list[Node] = []
    counts: dict[str, int] = {}
    blocks = {name for name, m in model.named_modules() if name and _is_block(m)}
    open_blocks: list[str] = []

    def inside(name: str) -> str | None:
        owners = [b for b in blocks if name.startswith(b + ".")]
        return max(owners, key=len) if owners else None

    def pre(name):
        def hook(module, inputs):
            open_blocks.append(name)

        return hook

    def post(name):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            counts[name] = counts.get(name, 0) + 1
            call = name if counts[name] == 1 else f"{name}#{counts[name]}"
            nodes.append(Node(call, module, inputs[0].detach().clone(), output.detach().clone(), inside(name)))
            if name in blocks:
                open_blocks.pop()

        return hook

    handles = []
    for name, m in model.named_modules():
        if not name:
            continue
        if name in blocks:
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
        elif next(m.children(), None) is None:
            handles.append(m.register_forward_hook(post(name)))
    was_training = model.training
    try:
        with torch.no_grad(), _no_inplace(model):
            logits = model.eval()(x).float()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    by_name = {n.name: n for n in nodes}
    for n in nodes:
        if n.parent:
            by_name[n.parent].children.append(n.name)
    return nodes, logits


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().float().cpu().contiguous().numpy().astype("<f4").tobytes()).decode()


def _pad(module: nn.Conv2d) -> tuple[int, int] | None:
    """A conv's padding as (rows, columns) on each side; None for an even kernel under 'same' (uneven padding)."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return 0, 0
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
    return tuple(module.padding)  # type: ignore[return-value]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding: within 1e-4 of the larger magnitude (a different summation order differs)."""
    if a.shape != b.shape:
        return False
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= 1e-4 * scale


def _describe(node: Node) -> dict:
    """What the page needs to redo a layer's arithmetic for one unit, after checking that the functional form
    of the layer, on its real input, gives its real output."""
    m, x, out = node.module, node.x.float(), node.out.float()
    if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and _pad(m) is not None:
        ph, pw = cast(tuple[int, int], _pad(m))  # not None: checked above
        want = F.conv2d(
            x, m.weight.float(), None if m.bias is None else m.bias.float(), m.stride, (ph, pw), m.dilation, m.groups
        )
        if _close(want, out):
            return {
                "kind": "conv",
                "label": f"conv {m.in_channels}\u2192{m.out_channels}, "
                f"{m.kernel_size[0]}\u00d7{m.kernel_size[1]}" + (f", stride {m.stride[0]}" if m.stride[0] > 1 else ""),
                "stride": list(m.stride),
                "padding": [ph, pw],
                "dilation": list(m.dilation),
                "groups": m.groups,
                "kernel": list(m.kernel_size),
            }
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and not m.ceil_mode and x.dim() == 4:
        k, s, p = (
            tuple(v) if isinstance(v, (tuple, list)) else (v, v)
            for v in (m.kernel_size, m.stride or m.kernel_size, m.padding)
        )
        is_max = isinstance(m, nn.MaxPool2d)
        d = getattr(m, "dilation", 1)
        if (d == 1 or d == (1, 1)) and (is_max or p == (0, 0)):
            want = F.max_pool2d(x, k, s, p) if is_max else F.avg_pool2d(x, k, s, p)
            if _close(want, out):
                return {
                    "kind": "pool",
                    "op": "max" if is_max else "mean",
                    "label": f"{'max' if is_max else 'average'} pool {k[0]}\u00d7{k[1]}, stride {s[0]}",
                    "kernel": list(k),
                    "stride": list(s),
                    "padding": list(p),
                }
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and x.dim() == 4 and out.shape[2:] == (1, 1):
        is_max = isinstance(m, nn.AdaptiveMaxPool2d)
        return {
            "kind": "pool",
            "op": "max" if is_max else "mean",
            "label": f"global {'max' if is_max else 'average'} pool",
            "kernel": list(x.shape[2:]),
            "stride": list(x.shape[2:]),
            "padding": [0, 0],
        }
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and x.dim() == 4:
        assert m.running_var is not None  # tracked together with running_mean
        want = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        if _close(want, out):
            scale = (m.weight if m.weight is not None else torch.ones_like(m.running_var)).float()
            shift = (m.bias if m.bias is not None else torch.zeros_like(m.running_mean)).float()
            return {
                "kind": "bn",
                "label": "batch norm",
                "mean": m.running_mean.float().tolist(),
                "var": m.running_var.float().tolist(),
                "eps": m.eps,
                "gamma": scale.tolist(),
                "beta": shift.tolist(),
            }
    for cls, name in _ACTIVATIONS.items():
        if type(m) is cls:
            return {"kind": "act", "label": name}
    if isinstance(m, nn.Linear) and x.dim() == 2:
        want = F.linear(x, m.weight.float(), None if m.bias is None else m.bias.float())
        if _close(want, out):
            return {"kind": "linear", "label": f"dense {m.in_features}\u2192{m.out_features}"}
    if _is_block(m):
        return {"kind": "block", "label": f"{type(m).__name__}"}
    return {"kind": "other", "label": type(m).__name__}


def _maps_shown(nodes: list[Node], sources: list, budget_floats: int, n_images: int) -> int:
    """The most maps per layer (a power of two, or all) whose values fit the budget for all images: each layer's
    output, the inputs no shown layer gave, and a convolution's share of the maps left out."""
    channels = max([n.out.shape[1] for n in nodes if n.out.dim() == 4] + [1])

    def floats(cap: int) -> int:
        total = 0
        for node, src in zip(nodes, sources):
            if isinstance(node.module, _SKIPPED) or node.children:
                continue
            for t in (node.out, node.x if src is None else None):
                if t is not None:
                    total += min(cap, t.shape[1]) * t[0, 0].numel() if t.dim() == 4 else min(t.shape[1], _MAX_UNITS)
            if isinstance(node.module, nn.Conv2d) and node.x.shape[1] > cap:
                total += min(cap, node.out.shape[1]) * node.out[0, 0].numel()
            if isinstance(node.module, nn.Conv2d):
                total += node.module.weight[:cap].numel() // n_images
        return total * n_images

    cap = channels
    while cap > 1 and floats(cap) > budget_floats:
        cap = cap // 2 if cap & (cap - 1) == 0 else 1 << (cap.bit_length() - 1)
    return cap


def _layers_and_acts(nodes: list[Node], sources: list, x: torch.Tensor, cap: int) -> tuple[list[dict], list[dict]]:
    """The page's description of each shown layer and, per image, the values it holds, at most `cap` maps a layer."""
    n = x.shape[0]
    index = {node.name: i for i, node in enumerate(nodes)}
    layers: list[dict] = []
    acts: list[dict[str, Any]] = [{"input": _b64(x[b])} for b in range(n)]
    held: dict[str, int] = {"input": x.shape[1]}  # maps the page holds of each layer's output
    for i, node in enumerate(nodes):
        if isinstance(node.module, _SKIPPED):
            continue
        info = _describe(node)
        out = node.out.float()
        spatial = out.dim() == 4
        shown = min(cap, out.shape[1]) if spatial else min(out.shape[1], _MAX_UNITS)
        layer = {"id": node.name, "parent": node.parent, "shape": list(out.shape[1:]), "shown": shown, **info}
        held[node.name] = shown
        if node.children:
            layer["children"] = [c for c in node.children if not isinstance(nodes[index[c]].module, _SKIPPED)]
            down = [c for c in layer["children"] if c.startswith(node.name + ".downsample")]
            layer["shortcut"] = down[-1] if down else "identity"
            last = nodes[index[layer["children"][-1]]]
            # the sum of the two paths is the input of the block's last activation
            layer["sum_of"] = last.name if _describe(last)["kind"] == "act" else None
            layer["residual"] = getattr(node.module, "residual", True) is not False
        src = sources[i]
        layer["src"] = src if src is None or src == "input" else nodes[src].name
        if src is None and info["kind"] in ("conv", "pool", "bn", "act"):
            layer["src"] = node.name + "/in"  # an input no shown layer gave (a residual sum, a functional op)
            layer["in_shape"] = list(node.x.shape[1:])
            held[layer["src"]] = min(cap, node.x.shape[1]) if node.x.dim() == 4 else node.x.shape[1]
            for b in range(n):
                acts[b][layer["src"]] = _b64(node.x[b, : held[layer["src"]]])
        m: Any = node.module  # a Conv2d or a Linear where its weights are read
        if info["kind"] == "conv":
            layer["weight"] = _b64(m.weight[:shown])
            layer["bias"] = [0.0] * shown if m.bias is None else m.bias[:shown].float().tolist()
            have, c_in = held.get(layer["src"], 0), node.x.shape[1]
            layer["held"] = have
            if have < c_in:  # the maps the page does not hold add their share of each output, from PyTorch
                ph, pw = info["padding"]
                xin = node.x.float()
                full = F.conv2d(xin, m.weight.float(), None, m.stride, (ph, pw), m.dilation, m.groups)
                part = xin.clone()
                part[:, have:] = 0
                rest = full - F.conv2d(part, m.weight.float(), None, m.stride, (ph, pw), m.dilation, m.groups)
                for b in range(n):
                    acts[b][node.name + "/rest"] = _b64(rest[b, :shown])
        if info["kind"] == "linear":
            # the largest products of each unit, from PyTorch: a dense layer's weights are too many to embed
            xin = node.x.float()
            layer["bias"] = [0.0] * shown if m.bias is None else m.bias[:shown].float().tolist()
            k = min(_TOP_PRODUCTS, xin.shape[1])
            for b in range(n):
                products = xin[b][None, :] * m.weight[:shown].float()  # (units, inputs)
                top = products.abs().topk(k, dim=1).indices
                acts[b][node.name + "/top"] = {
                    "index": top.tolist(),
                    "x": xin[b][top].tolist(),
                    "w": m.weight[:shown].float().gather(1, top).tolist(),
                    "rest": (products.sum(1) - products.gather(1, top).sum(1)).tolist(),
                }
        if node.children and torch.equal(nodes[index[layer["children"][-1]]].out, node.out):
            layer["same_as"] = layer["children"][-1]  # a block's output is its last layer's: stored once
        else:
            for b in range(n):
                acts[b][node.name] = _b64(out[b, :shown])
        layers.append(layer)
    return layers, acts


def explain_data(
    loaded,
    images: Sequence[np.ndarray],
    names: Sequence[str],
    labels: Sequence[int | None] | None = None,
    cam_layer: str | None = None,
    budget: int = DEFAULT_BUDGET,
    title: str = "",
    cap: int | None = None,
) -> dict:
    """What the page shows for `images` (uint8 (C, H, W) each, already in the model's size, as
    `cnnlab.inference.predict.load_image` gives them) under a loaded model (`LoadedModel`). `cap`: this many maps
    per layer at most, instead of as many as the budget allows (a live page adds images to a layout)."""
    if not len(images):
        raise ConfigError("explain needs at least one image")
    model = loaded.model
    device = next(model.parameters()).device
    pixels = torch.from_numpy(np.stack(images)).to(device)
    x = loaded.normalise(pixels).float()
    model = model.float()
    nodes, logits = trace_model(model, x)
    probs = logits.softmax(1)
    n = len(images)

    # each call's input: the output of the latest earlier shown call that equals it, the image, or its own copy
    def fingerprint(t: torch.Tensor) -> tuple:  # equal tensors have equal fingerprints; most others do not
        flat = t.reshape(-1)
        return tuple(t.shape), float(flat[:: max(1, flat.numel() // 64)].sum())

    prints = [fingerprint(nd.out) for nd in nodes]
    sources: list[int | str | None] = []
    for i, node in enumerate(nodes):
        want = fingerprint(node.x)
        src: int | str | None = "input" if want == fingerprint(x) and torch.equal(node.x, x) else None
        for j in range(i - 1, -1, -1):
            if src is not None:
                break
            if not isinstance(nodes[j].module, _SKIPPED) and prints[j] == want and torch.equal(nodes[j].out, node.x):
                src = j
        sources.append(src)

    # the budget: a first guess from the sizes, then fewer maps until the page really fits
    fixed = cap is not None
    cap = cap or _maps_shown(nodes, sources, int(budget * 0.8 / 5.4), n)  # float32 in base64: 5.33 bytes a value
    while True:
        with torch.no_grad():
            layers, acts = _layers_and_acts(nodes, sources, x, cap)
        size = sum(len(json.dumps(a, separators=(",", ":"))) for a in acts) + len(json.dumps(layers))
        if fixed or size <= budget * 0.85 or cap == 1:  # the rest: pictures, Grad-CAM overlays, the page itself
            break
        cap = max(1, cap // 2)

    cam_layer = cam_layer or default_cam_layer(model, tuple(x.shape[1:]))
    n_classes = logits.shape[1]
    cam_classes = list(range(n_classes)) if n_classes <= _MAX_CAM_CLASSES else None
    wanted = cam_classes or sorted({c for b in range(n) for c in probs[b].topk(5).indices.tolist()})
    rgb = pixels.cpu().numpy().transpose(0, 2, 3, 1)
    if rgb.shape[3] == 1:
        rgb = rgb[..., 0]
    cams: list[dict] = [{} for _ in range(n)]
    for c, results in zip(wanted, grad_cams(model, x, cam_layer, wanted)):  # one forward, a backward per class
        for b, r in enumerate(results):
            if cam_classes or c in probs[b].topk(5).indices.tolist():
                cams[b][str(c)] = png_data_uri(overlay(rgb[b], r.cam.numpy()))
    out_images = []
    for b in range(n):
        label = None if labels is None else labels[b]
        out_images.append(
            {
                "name": names[b],
                "label": None if label is None else int(label),
                "preview": png_data_uri(rgb[b]),
                "logits": logits[b].tolist(),
                "probs": probs[b].tolist(),
                "pred": int(probs[b].argmax()),
                "acts": acts[b],
                "cams": cams[b],
            }
        )
    columns = [layer["id"] for layer in layers if layer["parent"] is None]
    truncated = [
        layer["id"]
        for layer in layers
        if layer["shape"] and len(layer["shape"]) == 3 and layer["shown"] < layer["shape"][0]
    ]
    note = (
        f"Layers with more than {cap} maps show their first {cap}, so that the page stays within "
        f"{budget / 1e6:g} MB; a convolution's sum then adds the other maps' share as one number, computed by "
        "PyTorch."
        if truncated
        else f"Every map of every layer is shown (page budget {budget / 1e6:g} MB)."
    )
    data = {
        "title": title or f"{loaded.meta['model']}: inside the network",
        "model": loaded.meta["model"],
        "classes": list(loaded.classes),
        "input_shape": list(x.shape[1:]),
        "mean": list(loaded.mean),
        "std": list(loaded.std),
        "layers": layers,
        "columns": columns,
        "cap": cap,
        "note": note,
        "cam_layer": cam_layer,
        "cam_classes": cam_classes,
        "images": out_images,
    }
    size = len(explain_html(data).encode())
    if size > budget and not fixed:
        raise ConfigError(
            f"{n} image(s) of {loaded.meta['model']} need {size / 1e6:.1f} MB even with one map per "
            f"layer, over the page budget of {budget / 1e6:g} MB: give fewer images or "
            f"--budget-mb {size / 1e6 + 0.1:.1f}"
        )
    return data


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def explain_html(data: dict, live: bool = False) -> str:
    """The page around `data` (from `explain_data`); `live` adds the upload form that talks to `cnnlab serve`."""
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'" + (
        "; connect-src 'self'" if live else ""
    )
    parts = {
        "CSS": _asset("explain_page.css"),
        "SCRIPT": _asset("explain_page.js"),
        "DATA": payload,
        "TITLE": html.escape(data["title"]),
        "CSP": csp,
        "LIVE": "true" if live else "false",
    }
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda m: parts[m.group(1)], _asset("explain_page.html"))


def write_explain_page(path: str | Path, data: dict) -> Path:
    """Write the page for `data` to `path`, complete or not at all; returns the path."""
    path = Path(path)
    page = explain_html(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_atomic(page.encode("utf-8"), path)


def explain_files(loaded, paths: Sequence[str | Path], **options) -> dict:
    """`explain_data` for image files, read and converted as `cnnlab predict` reads them."""
    from ..inference.predict import load_image

    images = [load_image(Path(p), loaded.preprocess)[0] for p in paths]
    return explain_data(loaded, images, [Path(p).name for p in paths], **options)


def pick_test_images(
    run_dir: str | Path, loaded, count: int = 8, data_dir: str | None = None, scan: int = 512, log=print
) -> tuple[list[np.ndarray], list[str], list[int]]:
    """Up to `count` of a run's test images: among the first `scan`, the first wrongly classified ones (up to
    half) and the first right ones, in test-split order."""
    from ..inference.evaluate import inference_runtime
    from ..inference.test_split import open_test_split
    from ..run import Run, is_run_folder

    if not is_run_folder(run_dir):
        raise ConfigError(
            f"{run_dir}: not a run folder, so there are no test images to pick; give image files: "
            "'cnnlab explain WEIGHTS IMAGE...'"
        )
    run = Run(run_dir)
    split = open_test_split(
        run.config.dataset,
        run.data_dir(data_dir),
        preprocess=loaded.preprocess,
        runtime=inference_runtime("cpu", "fp32"),
        streamed=run.data_mode == "stream",
        workers=0,
        log=log,
    )
    if split.labels is None:
        raise ConfigError(f"{run_dir}: its test split is not indexed (shards); give image files instead")
    n = min(scan, len(split.labels))
    images = [np.ascontiguousarray(split.image(i).transpose(2, 0, 1)) for i in range(n)]
    if tuple(images[0].shape) != tuple(loaded.input_shape):
        raise ConfigError(
            f"{run_dir}: test images are {images[0].shape}, the model takes {loaded.input_shape}; "
            "give image files instead"
        )
    with torch.no_grad():
        x = loaded.normalise(torch.from_numpy(np.stack(images)))
        pred = loaded.model.float().eval()(x).argmax(1)
    labels = split.labels[:n].long()
    wrong = [i for i in range(n) if pred[i] != labels[i]][: count // 2]
    right = [i for i in range(n) if pred[i] == labels[i]][: count - len(wrong)]
    chosen = sorted(wrong + right)
    return [images[i] for i in chosen], [f"test image {i}" for i in chosen], [int(labels[i]) for i in chosen]
