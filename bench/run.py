"""`make bench`: every benchmark, each printing its conditions and whether it met its target (the airbench94 run
last: about an hour or more on a 2-core CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import airbench  # noqa: E402
import cifar_convnet  # noqa: E402
import ddp  # noqa: E402
import default_train  # noqa: E402
import export  # noqa: E402
import formats  # noqa: E402
import loader  # noqa: E402
import loggers  # noqa: E402
import nan_check  # noqa: E402
import precision  # noqa: E402
import resnet  # noqa: E402
import serve  # noqa: E402
import stream  # noqa: E402
import throughput  # noqa: E402

if __name__ == "__main__":
    results = [
        formats.main(),
        loader.main(),
        throughput.main(),
        default_train.main(),
        cifar_convnet.main(),
        resnet.main(),
        nan_check.main(),
        stream.main(),
        precision.main(),
        export.main(),
        serve.main(),
        loggers.main(),
        ddp.main(),
        airbench.main(),
    ]
    raise SystemExit(0 if all(results) else 1)
