"""`cnnlab viz`: which picture to draw from which arguments (the CLI only dispatches here)."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

__all__ = ["viz_command"]


def _out_dir(args, target: str | None = None) -> Path:
    """--out, else RUN_DIR/viz for a run folder, else ./viz; made only when the first file is written."""
    return Path(args.out) if args.out else Path(target) / "viz" if target and Path(target).is_dir() else Path("viz")


def _load_for_viz(args):
    from ..engine.weights import load_weights
    return load_weights(args.target, "cpu", model_name=getattr(args, "model", None))


def _default(value, default):
    return default if value is None else value


def _draw(args) -> int:
    out = _out_dir(args, args.target)
    if args.what == "conv" and args.html:
        from .conv_page import write_conv_page
        print(write_conv_page(out / "conv.html", image=args.image, filters=_default(args.filters, 2),
                              size=_default(args.size, 7)))
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
        from ..engine.predict import load_image
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
        plot_feature_maps(maps, pixels.transpose(1, 2, 0), path, title=f"Feature maps of {Path(args.image).name}",
                          kinds=kinds)
        for name, act in maps.items():
            print(f"{name}: {tuple(act.shape)} {kinds[name]}")
        print(path)
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
    if args.what in ("filters", "features", "gabor") and not args.target:
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
