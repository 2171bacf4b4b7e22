"""`cnnlab viz`: which picture to draw from which arguments (the CLI only dispatches here)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import CnnlabError, ConfigError

__all__ = ["viz_command", "explain_command", "add_viz_parsers"]


def _out_dir(args, target: str | None = None) -> Path:
    """--out, else RUN_DIR/viz for a run folder, else ./viz; made only when the first file is written."""
    return Path(args.out) if args.out else Path(target) / "viz" if target and Path(target).is_dir() else Path("viz")


def _load_for_viz(args):
    from ..inference.weights import load_weights

    return load_weights(args.target, "cpu", model_name=getattr(args, "model", None))


def _default(value, default):
    return default if value is None else value


def _draw(args) -> int:
    out = _out_dir(args, args.target)
    if args.what == "conv" and args.html:
        from .conv_page import write_conv_page

        print(
            write_conv_page(
                out / "conv.html", image=args.image, filters=_default(args.filters, 2), size=_default(args.size, 7)
            )
        )
    elif args.what == "conv":
        from .slides import render_conv

        paths = render_conv(out, image=args.image, filters=_default(args.filters, 5), size=_default(args.size, 16))
        print("\n".join(map(str, paths)))
    elif args.what == "pool":
        from .conv import edge_feature_map, load_image
        from .pool import render_pool

        image = load_image(args.image, gray=False) if args.image else None
        result = render_pool(out, feature_map=edge_feature_map(image))
        print(result["caption"])
        print(result["path"])
    elif args.what == "filters":
        from .filters import conv_layers, layer_weight, plot_filters

        loaded = _load_for_viz(args)
        name, weight = layer_weight(loaded.model, args.layer)
        first = name == next(iter(conv_layers(loaded.model)))
        path = out / f"filters-{name.replace('.', '_')}.png"
        plot_filters(weight, path, layer=name, first_layer=first)
        print(f"{name}: {weight.shape[0]} filters of {'x'.join(map(str, weight.shape[1:]))} -> {path}")
    elif args.what == "features":
        # the "conv" branch above imports conv.load_image under the same name
        from ..inference.predict import load_image  # type: ignore[assignment]
        from .filters import default_feature_layers, feature_maps, layer_kinds, plot_feature_maps

        if not args.image:
            raise ConfigError("'cnnlab viz features RUN_DIR IMAGE': give the image to look at")
        loaded = _load_for_viz(args)
        pixels, _ = load_image(Path(args.image), loaded.preprocess)
        import torch

        x = loaded.normalise(torch.tensor(pixels)[None])
        layers = args.layers.split(",") if args.layers else default_feature_layers(loaded.model)
        maps = feature_maps(loaded.model, x, layers)
        kinds = layer_kinds(loaded.model, list(maps))
        path = out / f"features-{Path(args.image).stem}.png"  # one file per image: a second image keeps the first
        plot_feature_maps(
            maps, pixels.transpose(1, 2, 0), path, title=f"Feature maps of {Path(args.image).name}", kinds=kinds
        )
        for name, act in maps.items():
            print(f"{name}: {tuple(act.shape)} {kinds[name]}")
        print(path)
    elif args.what == "cam":
        from .gradcam import cam_files

        if not args.image:
            raise ConfigError("'cnnlab viz cam RUN_DIR IMAGE...': give the images to explain")
        loaded = _load_for_viz(args)
        for path, r in cam_files(loaded, [args.image, *args.more_images], out, args.layer, args.cam_class):
            print(
                f"{path}: layer {r.layer}, class {loaded.classes[r.target]} "
                f"(probability {float(r.probs[r.target]):.3f})"
            )
    elif args.what == "gabor":
        from .filters import layer_weight
        from .gabor import analyze_filters, format_gabor_summary

        loaded = _load_for_viz(args)
        _, weight = layer_weight(loaded.model)
        result = analyze_filters(weight, out, threshold=args.threshold)
        print(format_gabor_summary(result))
    return 0


def viz_command(args) -> int:
    """`cnnlab viz WHAT ...`: check the arguments, draw, and leave no empty folder behind on failure."""
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
        return _draw(args)
    except BaseException:
        for folder in new:
            try:
                folder.rmdir()  # only ever removes an empty folder
            except OSError:
                break
        raise


def explain_command(args) -> int:
    """`cnnlab explain RUN|WEIGHTS [IMAGE ...]`: the explainer page for the given images or some test images."""
    from ..inference.predict import expand_inputs
    from ..inference.weights import load_weights
    from ..run import RUN_FILES
    from .explain import explain_data, explain_files, pick_test_images, write_explain_page

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
        images, names, labels = pick_test_images(
            args.target, loaded, args.count, args.data_dir, log=lambda m: print(m, file=sys.stderr)
        )
        data = explain_data(loaded, images, names, labels, **options)
    target = Path(args.target)
    out = (
        Path(args.out) if args.out else target / RUN_FILES["explain"] if target.is_dir() else Path(RUN_FILES["explain"])
    )
    path = write_explain_page(out, data)
    print(
        f"{path} ({path.stat().st_size / 1e6:.2f} MB, {len(data['images'])} image(s), "
        f"{data['cap']} maps per layer at most)"
    )
    return 0


def add_viz_parsers(sub, count_type) -> None:
    """The parsers of `cnnlab viz`, `cnnlab explain` and `cnnlab serve` (which serves the explain page)."""
    p = sub.add_parser(
        "viz",
        help="pictures: convolution and pooling, filters, feature maps, the V1 comparison",
        description="conv: the lecture's convolution slides (GIFs and PNGs), or with --html an "
        "interactive page; pool: max pooling on a "
        "feature map; filters RUN_DIR|WEIGHTS: a layer's filters; features RUN_DIR IMAGE: "
        "activation maps; gabor RUN_DIR|WEIGHTS: Gabor fits of the first layer against "
        "macaque V1 (Ringach 2002); cam RUN_DIR IMAGE...: Grad-CAM overlays (Selvaraju et al. 2017)",
    )
    p.add_argument("what", choices=("conv", "pool", "filters", "features", "gabor", "cam"))
    p.add_argument("target", nargs="?", metavar="RUN_DIR|WEIGHTS", help="for filters, features, gabor and cam")
    p.add_argument("image", nargs="?", metavar="IMAGE", help="for features and cam")
    p.add_argument("more_images", nargs="*", metavar="IMAGE", help="cam: more images")
    p.add_argument(
        "--class",
        dest="cam_class",
        metavar="NAME|INDEX",
        help="cam: the class to explain (default: each image's predicted class)",
    )
    p.add_argument("--image", dest="image_flag", metavar="PATH", help="conv and pool: your own image")
    p.add_argument(
        "--html",
        action="store_true",
        help="conv: write conv.html, an interactive page (window "
        "stepping, stride, padding, max pooling) instead of the slides",
    )
    p.add_argument(
        "--filters", type=int, help="conv: filters on the colour slide (1-8; default 5) or on the page (default 2)"
    )
    p.add_argument(
        "--size", type=int, help="conv: image side in pixels (default 16 on the slides, 3-32; 7 on the page, 4-12)"
    )
    p.add_argument(
        "--layer",
        help="filters: a conv layer by dotted name (default: the first); cam: the layer "
        "Grad-CAM looks at (default: the last convolutional stage)",
    )
    p.add_argument(
        "--layers", help="features: comma-separated layer names (default: the first 3 conv layers and the last)"
    )
    p.add_argument("--threshold", type=float, default=0.5, help="gabor: R^2 at which a fit counts as good")
    p.add_argument("--model", help="model name for a plain state-dict file without a sidecar")
    p.add_argument("--out", help="output folder (default RUN_DIR/viz, or ./viz)")

    p = sub.add_parser(
        "explain",
        help="one self-contained page: your model's layers on your images, the arithmetic of any unit, Grad-CAM",
        description="Every layer's output maps for each image "
        "(without images: a few of the run's test images, right and wrong ones), a click on a map "
        "for one pixel's arithmetic, Grad-CAM for each class. Inline script and styles, images as "
        "data: URIs: it fetches nothing, works offline and can be mailed.",
    )
    p.add_argument("target", metavar="RUN_DIR|WEIGHTS")
    p.add_argument("images", nargs="*", metavar="IMAGE|DIR")
    p.add_argument("--out", metavar="FILE", help="default RUN_DIR/explain.html, or ./explain.html")
    p.add_argument("--count", type=count_type, default=8, help="test images to pick without IMAGE (default 8)")
    p.add_argument("--layer", help="the layer Grad-CAM looks at (default: the last convolutional stage)")
    p.add_argument(
        "--budget-mb",
        type=float,
        default=5.0,
        help="page size to stay within: larger models show fewer maps per layer (default 5)",
    )
    p.add_argument("--data-dir", help="where the run's test split is, if not where the run found it")
    p.add_argument("--model", help="model name for a plain state-dict file without a sidecar")

    p = sub.add_parser(
        "serve",
        help="the explain page live and a JSON prediction API (FastAPI + uvicorn)",
        description="GET / : the explain page, taking uploaded, dropped or pasted images; POST "
        "/v1/predict: image files -> what 'cnnlab predict --json' gives; GET /v1/model, "
        "/healthz; OpenAPI at /docs and /openapi.json. Needs the serve extra: "
        "pip install 'cnnlab[serve]'.",
    )
    p.add_argument("target", metavar="RUN_DIR|WEIGHTS")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine "
        "only; any other is reachable by others, with no authentication)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=20.0,
        help="largest file accepted, in MB (default 20; images are also held to 64 megapixels)",
    )
    p.add_argument("--layer", help="the layer Grad-CAM looks at (default: the last convolutional stage)")
    p.add_argument("--data-dir", help="where the run's test split is, if not where the run found it")
    p.add_argument("--model", help="model name for a plain state-dict file without a sidecar")
