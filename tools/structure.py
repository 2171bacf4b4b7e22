"""The structure figures issue 20 asked for, measured on the tree as it is (run from the repository root):

    python tools/structure.py

- engine/ split: the packages under src/cnnlab;
- functions besides `fit` that take the whole TrainConfig (a parameter annotated TrainConfig), outside
  the config's own modules (training/config.py, training/recipes.py);
- files that spell a run-folder file name (run.py's RUN_FILES) outside the module that owns them;
- places that resize a decoded image (Pillow's `.resize(`, torch's `F.interpolate(`) outside models;
- cli.py's lines; import cycles (tools/import_cycles.py); repeated blocks of 6+ lines in src/ (`duplicates`).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

SRC = Path("src/cnnlab")


def whole_config_functions() -> list[str]:
    found = []
    owners = {SRC / "training" / "config.py", SRC / "training" / "recipes.py"}  # the config's own modules
    for path in sorted(set(SRC.rglob("*.py")) - owners):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "fit":
                args = node.args.args + node.args.kwonlyargs + node.args.posonlyargs
                if any(a.annotation is not None and "TrainConfig" in ast.unparse(a.annotation) for a in args):
                    found.append(f"{path}:{node.lineno} {node.name}")
    return found


def run_file_names() -> list[str]:
    sys.path.insert(0, "src")
    from cnnlab.run import RUN_FILES

    names = [n for n in RUN_FILES.values() if "." in n]  # file names; folder names like 'viz' are common words
    pattern = re.compile(
        "|".join(re.escape(f'"{n}"') + "|" + re.escape(f"'{n}'") + "|" + re.escape(f'/ "{n}') for n in names)
    )
    return sorted(str(p) for p in SRC.rglob("*.py") if p != SRC / "run.py" and pattern.search(p.read_text()))


def resize_places() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if "models" in path.parts:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\.resize\(\(|F\.interpolate\(|\.resize\([a-z_]+, Image\.", code):
                found.append(f"{path}:{i}: {line.strip()[:90]}")
    return found


def main() -> int:
    packages = sorted(p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    print(f"packages under src/cnnlab: {', '.join(packages)}")
    funcs = whole_config_functions()
    print(f"functions besides fit taking the whole TrainConfig: {len(funcs)}")
    for f in funcs:
        print(f"  {f}")
    files = run_file_names()
    print(f"files besides run.py that spell a run-folder file name: {len(files)}")
    for f in files:
        print(f"  {f}")
    places = resize_places()
    print(f"places that resize an image: {len(places)}")
    for p in places:
        print(f"  {p}")
    print(f"cli.py: {len((SRC / 'cli.py').read_text().splitlines())} lines")
    subprocess.run([sys.executable, "tools/import_cycles.py", str(SRC)])
    if shutil.which("duplicates"):
        out = subprocess.run(
            ["duplicates", "--repo", str(SRC), "--most", "40", "--seconds", "60"], capture_output=True, text=True
        ).stdout
        print("repeated blocks of 6+ lines in src/: " + (out.splitlines() or ["?"])[0])
        print("\n".join("  " + line for line in out.splitlines()[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
