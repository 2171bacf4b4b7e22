"""The lecture's notebooks: each runs top to bottom in a fresh kernel (nbclient, this interpreter), in a temporary
working folder with a temporary cnnlab cache, and fails with the failing cell's error; and none is committed with
outputs."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
LECTURE_PARTS = [
    "01-convolutions",
    "02-pooling",
    "03-complete-network",
    "04-learned-features",
    "05-residual-networks",
    "06-inside-your-network",
]
NEEDS_CIFAR10 = {"03-complete-network", "04-learned-features", "05-residual-networks", "06-inside-your-network"}

nbformat = pytest.importorskip("nbformat")


def _runner():
    """notebooks/execute.py, which `make notebooks` runs too: one way to execute a notebook."""
    spec = importlib.util.spec_from_file_location("notebook_runner", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def notebook_cache(tmp_path_factory):
    """One temporary cnnlab cache for all notebooks: CIFAR-10 is decoded, and the CPU probed, once per session."""
    return tmp_path_factory.mktemp("notebook-cache")


def test_every_part_of_the_lecture_has_its_notebook_in_order():
    assert [p.stem for p in _runner().notebook_paths()] == LECTURE_PARTS


@pytest.mark.parametrize("name", LECTURE_PARTS)
def test_committed_notebooks_hold_no_outputs_and_end_with_how_to_go_further(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    with_outputs = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not with_outputs, (
        f"{name}: code cells {with_outputs} hold outputs or execution counts; clear them "
        "(Jupyter: Edit > Clear Outputs of All Cells) before committing"
    )
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.cells[-1].cell_type == "markdown" and nb.cells[-1].source.startswith("## Going further")


def test_the_kernel_is_ipykernels_own_python3_started_with_this_interpreter():
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager(kernel_dirs=[]).get_kernel_spec("python3")  # as execute.py asks for it
    assert spec.argv[0] == sys.executable and spec.argv[1:3] == ["-m", "ipykernel_launcher"]


@pytest.mark.integration
@pytest.mark.parametrize("name", LECTURE_PARTS)
def test_notebook_runs_top_to_bottom_in_a_fresh_kernel(name, tmp_path, notebook_cache, request):
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    runner = _runner()
    env = runner.kernel_environment(cache=notebook_cache)
    if name in NEEDS_CIFAR10:
        env["CNNLAB_DATA"] = str(request.getfixturevalue("shared_cifar10"))  # fails in CI when missing, else skips
    before = _repository_state()
    try:
        nb = runner.execute(NOTEBOOKS / f"{name}.ipynb", tmp_path, env=env)
    except (CellExecutionError, CellTimeoutError) as exc:
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # IPython colours its tracebacks
        pytest.fail(f"{name}.ipynb: {message}", pytrace=False)
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
    assert (tmp_path / "runs").is_dir() or name == "02-pooling"  # what they write lands in the working folder
    assert _repository_state() == before, "the notebook wrote into the repository"


def _repository_state() -> str:
    """Untracked and modified files in the checkout (none of them the notebook's business)."""
    result = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=NOTEBOOKS.parent, capture_output=True, text=True
    )
    return result.stdout if result.returncode == 0 else ""
