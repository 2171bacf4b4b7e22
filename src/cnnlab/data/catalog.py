"""The named datasets as data: files, publisher URLs with mirrors, and checksums.

Checksums of compressed downloads (`download_md5`) guard the transfer; checksums of the decompressed
content (`content`) identify the data itself, so a re-compressed copy (Debian re-gzips Fashion-MNIST)
still verifies. Sources: the publishers' pages, torchvision's `datasets/mnist.py` and `cifar.py`,
tensorflow-datasets' url_checksums.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DataFile", "Archive", "DatasetSpec", "CATALOG", "get_spec", "dataset_names"]


@dataclass(frozen=True)
class DataFile:
    """One file of a dataset as it lies on disk (possibly with a `.gz` suffix added)."""

    name: str
    content: str | None = None  # "md5:<hex>" or "sha256:<hex>" of the decompressed bytes
    size: int | None = None  # decompressed bytes
    download_md5: str | None = None  # md5 of the published (compressed) file, when downloaded one by one


@dataclass(frozen=True)
class Archive:
    """A published archive that unpacks into `folder`."""

    filename: str
    md5: str
    folder: str


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    format: str  # idx | cifar10 | cifar100 | imagefolder | synthetic
    shape: tuple[int, int, int]  # C, H, W
    classes: tuple[str, ...]
    counts: dict[str, int]  # images per split
    mirrors: tuple[str, ...] = ()
    files: dict[str, tuple[DataFile, ...]] = field(default_factory=dict)  # layout (folder name) -> files
    archive: Archive | None = None
    system_dirs: tuple[str, ...] = ()
    how_to_get: str = ""
    # What `augment: auto` trains with in memory: shifts and flips suit natural images and clothing; digits would
    # change meaning. Streamed data always takes RandomResizedCrop + flip.
    default_augment: str = "none"


_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
turtle wardrobe whale willow_tree wolf woman worm""".split()
)

# Synthetic datasets have real datasets' shapes and counts but no files (cnnlab.data.synthetic); ImageNet-shaped
# keeps ImageNet's 1,000 classes (so resnet50's head is the published one) with far fewer images.
_SYNTHETIC_NOTE = "generated in memory (cnnlab.data.synthetic): nothing to download; for benchmarks and tests only"


def _pattern_names(n: int) -> tuple[str, ...]:
    return tuple(f"pattern{i}" for i in range(n))


_IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_files(contents: tuple[str, ...], gz_md5s: tuple[str, ...]) -> tuple[DataFile, ...]:
    sizes = (47_040_016, 60_008, 7_840_016, 10_008)
    return tuple(DataFile(n, c, s, m) for n, c, s, m in zip(_IDX_NAMES, contents, sizes, gz_md5s))


CATALOG: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="fashion-mnist",
            description="Zalando's article images, 28x28 grayscale, 10 classes (Xiao et al. 2017)",
            format="idx",
            shape=(1, 28, 28),
            classes=_FASHION_CLASSES,
            counts={"train": 60_000, "test": 10_000},
            mirrors=(
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            ),
            files={
                "fashion-mnist": _idx_files(
                    (
                        "sha256:c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                        "sha256:bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                        "sha256:5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                        "sha256:0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                    ),
                    (
                        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                        "25c81989df183df01b3e8a0aad5dffbe",
                        "bef4ecab320f06d8554ea6380940ec79",
                        "bb300cfdad3c16e7a12a480ee83cd310",
                    ),
                )
            },
            system_dirs=("/usr/share/datasets/fashion-mnist",),
            how_to_get="on Debian/Ubuntu: 'sudo apt-get install dataset-fashion-mnist'; "
            "anywhere: 'cnnlab data fetch fashion-mnist'",
        ),
        DatasetSpec(
            name="mnist",
            description="handwritten digits, 28x28 grayscale, 10 classes (LeCun et al. 1998)",
            format="idx",
            shape=(1, 28, 28),
            classes=tuple("0123456789"),
            counts={"train": 60_000, "test": 10_000},
            mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
            files={
                "mnist": _idx_files(
                    (
                        "md5:6bbc9ace898e44ae57da46a324031adb",
                        "md5:a25bea736e30d166cdddb491f175f624",
                        "md5:2646ac647ad5339dbf082846283269ea",
                        "md5:27ae3e4e09519cfbb04c329615203637",
                    ),
                    (
                        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                        "d53e105ee54ea40749a09fcbcd1e9432",
                        "9fb629c4189551a2d022fa330f9573f3",
                        "ec29112dd5afa0611ce80d1b7f02629c",
                    ),
                )
            },
            system_dirs=("/usr/share/datasets/mnist",),
            how_to_get="'cnnlab data fetch mnist'",
        ),
        DatasetSpec(
            name="cifar10",
            description="tiny natural images, 32x32 RGB, 10 classes (Krizhevsky 2009)",
            format="cifar10",
            shape=(3, 32, 32),
            classes=_CIFAR10_CLASSES,
            counts={"train": 50_000, "test": 10_000},
            mirrors=("https://www.cs.toronto.edu/~kriz/",),
            files={
                "cifar-10-batches-py": tuple(
                    DataFile(n, "md5:" + m)
                    for n, m in (
                        ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                        ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                        ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                        ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                        ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
                        ("test_batch", "40351d587109b95175f43aff81a1287e"),
                    )
                ),
                "cifar-10-batches-bin": tuple(
                    DataFile(n, "md5:" + m, 30_730_000)
                    for n, m in (
                        ("data_batch_1.bin", "5dd7e06a14cb22eb9f671a540d1b7c25"),
                        ("data_batch_2.bin", "5ea93a67294ea407fff1d09f752e9692"),
                        ("data_batch_3.bin", "942cd6a4bcdd0dd3c604fbe906cb4421"),
                        ("data_batch_4.bin", "ae636b3ba5c66a11e91e8cb52e771fcb"),
                        ("data_batch_5.bin", "53f37980c15c3d472c316c40844f3f0d"),
                        ("test_batch.bin", "803d5f7f4d78ea53de84dbe85f74fb6d"),
                    )
                ),
            },
            archive=Archive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
            how_to_get="'cnnlab data fetch cifar10', or --data-dir pointing at a folder holding "
            "cifar-10-batches-py/ or cifar-10-batches-bin/",
            default_augment="crop:4:reflect,flip",
        ),
        DatasetSpec(
            name="cifar100",
            description="tiny natural images, 32x32 RGB, 100 classes (Krizhevsky 2009)",
            format="cifar100",
            shape=(3, 32, 32),
            classes=_CIFAR100_CLASSES,
            counts={"train": 50_000, "test": 10_000},
            mirrors=("https://www.cs.toronto.edu/~kriz/",),
            files={
                "cifar-100-python": (
                    DataFile("train", "md5:16019d7e3df5f24257cddd939b257f8d"),
                    DataFile("test", "md5:f0ef6b0ae62326f3e7ffdfab6717acfc"),
                ),
                "cifar-100-binary": (
                    DataFile("train.bin", "md5:6172c7755cfe09b2fe270c85cebc1b15", 153_700_000),
                    DataFile("test.bin", "md5:4499cfba6c016c1be1438163640a0898", 30_740_000),
                ),
            },
            archive=Archive("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
            how_to_get="'cnnlab data fetch cifar100', or --data-dir pointing at a folder holding "
            "cifar-100-python/ or cifar-100-binary/",
            default_augment="crop:4:reflect,flip",
        ),
        DatasetSpec(
            name="synthetic-cifar",
            description="SYNTHETIC, not real images: CIFAR-10's shape (32x32 RGB, 10 classes), class patterns plus "
            "noise",
            format="synthetic",
            shape=(3, 32, 32),
            classes=_pattern_names(10),
            counts={"train": 50_000, "test": 10_000},
            how_to_get=_SYNTHETIC_NOTE,
            default_augment="crop:4:reflect,flip",
        ),
        DatasetSpec(
            name="synthetic-imagenet",
            description="SYNTHETIC, not real images: ImageNet's input shape (224x224 RGB, 1,000 classes), class "
            "patterns plus noise",
            format="synthetic",
            shape=(3, 224, 224),
            classes=_pattern_names(1000),
            counts={"train": 6_400, "test": 1_000},
            how_to_get=_SYNTHETIC_NOTE,
            default_augment="flip",
        ),
        DatasetSpec(
            name="imagefolder",
            description="your own images: ROOT/<split>/<class>/*.png|jpg|... (splits 'train' and 'test')",
            format="imagefolder",
            shape=(0, 0, 0),
            classes=(),
            counts={},
            how_to_get="--data-dir ROOT, with ROOT/train/<class>/ and ROOT/test/<class>/ folders of images",
            default_augment="flip",
        ),
        DatasetSpec(
            name="shards",
            description="an image folder packed into tar shards by 'cnnlab data pack' (always streamed)",
            format="shards",
            shape=(0, 0, 0),
            classes=(),
            counts={},
            how_to_get="'cnnlab data pack ROOT OUT' writes OUT/manifest.json and the shards; then --data-dir OUT",
        ),
    )
}


def dataset_names() -> list[str]:
    return list(CATALOG)


def get_spec(name: str) -> DatasetSpec:
    from ..errors import DatasetError

    try:
        return CATALOG[name]
    except (KeyError, TypeError):
        import difflib

        close = difflib.get_close_matches(str(name), CATALOG, n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise DatasetError(f"unknown dataset {name!r}{hint}; valid datasets: {', '.join(CATALOG)}") from None
