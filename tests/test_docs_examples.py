"""Every shell example in README.md and docs/*.md runs as written.

The convention, in the markdown: a ```sh block is an example, and this test runs it. Its first lines may say
    # long: WHY     not run here (hours of training, several machines, setting up, or the test suite itself); its
                    `cnnlab ...` lines are still parsed by cnnlab's own argument parser, so a misspelt or renamed
                    flag or subcommand fails, and a script or test file it names must exist
    # needs: NAME   it reads the dataset NAME (fashion-mnist, mnist, cifar10): skipped where this machine lacks
                    it, a failure under CI, which must have it
    # slow: WHY     it runs, but in the slow suite (`make test-slow`): it trains, or starts a notebook kernel, which
                    takes minutes on a loaded 2-core machine
A syntax summary with placeholders (`cnnlab eval RUN_DIR|WEIGHTS ...`) is a ```text block: not an example.

Each block runs as one bash script (-e: the first failing command fails it) in a fresh temporary folder laid out
like a checkout, so relative paths mean what they mean there: bench/, notebooks/, tests/ and tools/ are links to
the repository's, ../shared is a link to the real one beside the repository (where CIFAR-10 and MNIST lie), and
CNNLAB_CACHE points into the folder. What an example writes (runs/, viz/, build/) stays in the folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
DIRECTIVE = re.compile(r"^#\s*(long|needs|slow):\s*(.*)$")
NEEDS = {"fashion-mnist": "fashion_mnist_dir", "cifar10": "shared_cifar10", "mnist": "shared_mnist"}
LINKED = ("bench", "notebooks", "tests", "tools")
BLOCK_TIMEOUT = 600  # seconds; the runnable examples take seconds each


def shell_blocks(page: Path) -> list[tuple[int, str]]:
    """(first line number, text) of each ```sh block of a markdown page."""
    blocks, lines, start, indent = [], page.read_text().splitlines(), None, ""
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if start is None and fence and fence["lang"] in ("sh", "bash", "shell"):
            start, indent, body = number, fence["indent"], []
        elif start is not None and fence and not fence["lang"]:
            blocks.append((start, "\n".join(body) + "\n"))
            start = None
        elif start is not None:
            body.append(line[len(indent) :] if line.startswith(indent) else line)
    return blocks


def directives(block: str) -> dict[str, str]:
    """The block's leading `# long:` / `# needs:` comments."""
    found = {}
    for line in block.splitlines():
        match = DIRECTIVE.match(line.strip())
        if not match:
            break
        found[match[1]] = match[2].strip()
    return found


EXAMPLES = [
    pytest.param(
        page,
        number,
        block,
        id=f"{page.relative_to(REPO)}:{number}",
        marks=[pytest.mark.slow] if "slow" in directives(block) else [],
    )
    for page in PAGES
    for number, block in shell_blocks(page)
]


def commands(block: str) -> list[list[str]]:
    """The block's command lines as argument lists, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def test_the_pages_have_examples_of_each_kind():
    kinds = [directives(block).keys() for _, _, block in (p.values for p in EXAMPLES)]
    assert len(EXAMPLES) >= 10
    assert all(kind in {k for ks in kinds for k in ks} for kind in ("long", "needs", "slow"))
    assert any("long" not in k for k in kinds)


@pytest.mark.parametrize("page, number, block", EXAMPLES)
def test_a_shell_example_runs_as_written(page, number, block, tmp_path, request):
    marks = directives(block)
    unknown = set(marks.get("needs", "").replace(",", " ").split()) - NEEDS.keys()
    assert not unknown, f"{page.name}:{number}: '# needs: {marks['needs']}' names no dataset this test knows"
    if "long" in marks:
        check_long_example(block, f"{page.name}:{number}")
        return
    env = {
        **os.environ,
        "CNNLAB_CACHE": str(tmp_path / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for name in marks.get("needs", "").replace(",", " ").split():
        folder = request.getfixturevalue(NEEDS[name])  # skips here, or fails under CI, when it is missing
        if name == "fashion-mnist":  # found by the default look-up in a checkout; here the cache is fresh
            env["CNNLAB_DATA"] = str(folder)
    start = time.perf_counter()
    done = run_block(block, tmp_path, env)
    print(f"{page.name}:{number}: {time.perf_counter() - start:.1f} s")
    assert done.returncode == 0, (
        f"{page.name}:{number} failed (exit {done.returncode}):\n{block}\n"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    )


def run_block(block: str, tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    """Run a block as one bash script in tmp_path/checkout, a folder laid out like a checkout."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in LINKED:
        (checkout / name).symlink_to(REPO / name)
    if (REPO.parent / "shared").is_dir():
        (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    script = tmp_path / "example.sh"
    script.write_text("set -euo pipefail\n" + block)
    return subprocess.run(
        ["bash", str(script)], cwd=checkout, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT
    )


def test_a_failing_line_fails_the_example_and_paths_resolve_as_in_a_checkout(tmp_path):
    done = run_block("ls bench/airbench.py notebooks/execute.py\nfalse\necho not reached\n", tmp_path, dict(os.environ))
    assert done.returncode != 0 and "bench/airbench.py" in done.stdout and "not reached" not in done.stdout


def check_long_example(block: str, where: str) -> None:
    """A long example is not run: its cnnlab commands must parse, and the files it names must exist."""
    from cnnlab.cli import build_parser

    for argv in commands(block):
        if "cnnlab" in argv:  # `cnnlab train ...`, and `torchrun ... -m cnnlab train ...`
            args = argv[argv.index("cnnlab") + 1 :]
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    build_parser().parse_args(args)  # --help and usage errors print: not wanted here
            except SystemExit as exc:  # --help exits 0: a valid command
                if exc.code == 0:
                    continue
                pytest.fail(f"{where}: 'cnnlab {shlex.join(args)}' is refused by cnnlab's parser (exit {exc.code})")
        for token in argv:
            if re.fullmatch(r"(bench|tests|tools|notebooks)/[\w./-]+\.(py|ipynb)", token):
                assert (REPO / token).is_file(), f"{where}: {token} does not exist"


def test_the_readme_links_lead_to_files():
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets
    missing = [t for t in targets if "://" not in t and not (REPO / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_a_long_example_with_a_misspelt_flag_fails():
    with pytest.raises(pytest.fail.Exception, match="refused by cnnlab's parser"):
        check_long_example("# long: x\ncnnlab train --epoch 3 --lrr 0.1\n", "here")
    check_long_example("# long: x\ncnnlab train --epochs 3 --lr 0.1  # a comment\n", "here")
