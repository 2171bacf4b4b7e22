"""`cnnlab data`: list, fetch, inspect or pack datasets (the CLI only dispatches here)."""

from __future__ import annotations

from pathlib import Path

from ..errors import CnnlabError, ConfigError

__all__ = ["data_command", "add_data_parser"]


def data_command(args) -> int:
    """`cnnlab data list|fetch|info|pack`."""
    from ..errors import DatasetError
    from . import CATALOG, fetch, get_spec, load_dataset, locate

    if args.action == "list":
        for spec in CATALOG.values():
            try:
                _, folder, paths = (
                    locate(spec, args.data_dir)
                    if spec.format not in ("imagefolder", "shards", "synthetic")
                    else (None, None, [])
                )
                size = sum(p.stat().st_size for p in paths)
                where = f"found in {folder} ({size / 2**20:.1f} MiB)" if folder else spec.how_to_get
            except DatasetError:
                where = f"not found; to get it: {spec.how_to_get}"
            counts = " / ".join(f"{n:,} {s}" for s, n in spec.counts.items())
            print(f"{spec.name:<14} {spec.description}{'; ' + counts if counts else ''}\n{'':<14} {where}")
        return 0
    if args.action == "pack":
        from .shards import pack_image_folder

        if not args.name or not args.dest:
            raise ConfigError("'cnnlab data pack ROOT OUT': give the image folder and the folder for the shards")
        manifest = pack_image_folder(args.name, args.dest, args.shard_size)
        print(
            f"{sum(manifest['counts'].values()):,} images of {len(manifest['classes'])} classes packed into "
            f"{args.dest}; train from them with --dataset shards --data-dir {args.dest}"
        )
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
    import torch

    from ..viz.plots import plot_montage
    from . import channel_stats

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
    plot_montage(
        data.train_images, data.train_labels, data.classes, Path(args.out), title=f"{args.name}: training samples"
    )
    print(f"montage written to {args.out}")
    return 0


def add_data_parser(sub) -> None:
    """The parser of `cnnlab data list|fetch|info|pack`."""
    p = sub.add_parser(
        "data",
        help="list, fetch, inspect or pack datasets",
        description="pack ROOT OUT: an image folder (ROOT/train|test/<class>/*) into WebDataset tar "
        "shards (the files' own bytes, KEY.<ext> + KEY.cls) and OUT/manifest.json",
    )
    p.add_argument("action", choices=("list", "fetch", "info", "pack"))
    p.add_argument("name", nargs="?", metavar="NAME|ROOT")
    p.add_argument("dest", nargs="?", metavar="OUT", help="pack: the folder for the shards and the manifest")
    p.add_argument("--shard-size", default="256MB", help="pack: bytes per shard, e.g. 256MB or 1GiB")
    p.add_argument("--data-dir")
    p.add_argument("--download", action="store_true", help="info: download the dataset if it is missing")
    p.add_argument("--out", help="info: where to write the montage PNG")
