"""Run the lecture notebooks top to bottom, each in a fresh kernel, with nbclient: what `make test` checks
(tests/test_notebooks.py) and what `make notebooks` publishes (executed copies, outputs included).

    python notebooks/execute.py [--out build/notebooks] [--timeout 900] [NOTEBOOK ...]

Each notebook runs in its own temporary working folder, so what it writes (runs/, GIFs) never lands in the
repository. The kernel is ipykernel's built-in `python3`, started with this very interpreter, whatever kernels
the user has installed. When $CNNLAB_DATA is unset and `../shared/datasets` lies next to the checkout (this
project's CIFAR-10), the kernels look there.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent
DEFAULT_TIMEOUT = 1800  # seconds per notebook, all cells together: a hang fails; ~2 minutes is the aim when idle, but
# two threads sharing a core with another busy process ran 15x slower here (notebook 3: 160 s per epoch against 10)


def notebook_paths() -> list[Path]:
    """The lecture's notebooks, in its order (01-convolutions.ipynb, ...)."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"))


def shared_datasets() -> Path | None:
    """`../shared/datasets` beside the checkout, where this project keeps CIFAR-10 and MNIST, if it is there."""
    folder = NOTEBOOKS.parent.parent / "shared" / "datasets"
    return folder if folder.is_dir() else None


def kernel_environment(cache: str | Path | None = None) -> dict[str, str]:
    """This process's environment for the kernel, with CNNLAB_CACHE set to `cache` (when given) and CNNLAB_DATA
    to the shared datasets (when unset and present)."""
    env = dict(os.environ)
    if cache is not None:
        env["CNNLAB_CACHE"] = str(cache)
    shared = shared_datasets()
    if not env.get("CNNLAB_DATA") and shared is not None:
        env["CNNLAB_DATA"] = str(shared)
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # the kernel's debugger otherwise warns on every start
    return env


def execute(
    path: str | Path, workdir: str | Path, timeout: float = DEFAULT_TIMEOUT, env: dict[str, str] | None = None
) -> nbformat.NotebookNode:
    """Run every cell of the notebook at `path` in a fresh kernel working in `workdir`; return it with its outputs.

    A failing cell raises nbclient's CellExecutionError, which carries the cell's source and traceback; running
    past `timeout` seconds, all cells together, raises CellTimeoutError.
    """
    nb = nbformat.read(path, as_version=4)
    # No kernel folders: only ipykernel's built-in python3, whose command is sys.executable. A 'python3' spec the
    # user installed (jupyter kernelspec list) might start another Python, without cnnlab or another version of it.
    manager = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", km=manager, resources={"metadata": {"path": str(workdir)}}
    )
    deadline = time.monotonic() + timeout
    # cleanup_kc: shut the kernel down at the end, although the kernel manager was made here, not by nbclient
    with client.setup_kernel(env=env if env is not None else kernel_environment(), cleanup_kc=True):
        for index, cell in enumerate(nb.cells):
            client.timeout = max(1, math.ceil(deadline - time.monotonic()))  # what is left of the notebook's time
            client.execute_cell(cell, index)
    return nb


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # kernels that have exited and been waited for
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in notebooks/")
    parser.add_argument("--out", type=Path, help="write the executed copies (outputs included) into this folder")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per notebook")
    args = parser.parse_args(argv)
    paths = args.notebooks or notebook_paths()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    total = 0.0
    for path in paths:
        start, cpu = time.perf_counter(), _children_cpu_seconds()
        with tempfile.TemporaryDirectory(prefix="cnnlab-notebook-") as workdir:
            nb = execute(path, workdir, args.timeout)
        seconds = time.perf_counter() - start
        total += seconds
        print(f"{path.name}: {seconds:.1f} s wall, {_children_cpu_seconds() - cpu:.1f} s CPU (kernel)", flush=True)
        if args.out:
            nbformat.write(nb, args.out / path.name)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{len(paths)} notebooks: {total:.1f} s wall on {os.cpu_count()} CPUs, load average {load:.1f} at the end"
        + (f"; executed copies in {args.out}" if args.out else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
