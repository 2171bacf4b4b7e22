"""Import cycles among cnnlab's modules. Every import counts, a late one inside a function too (it is still a
loop in the design); `--module-level` counts only the imports that run when a module loads. A package's __init__
counts as a module: importing cnnlab.engine.x imports cnnlab.engine first. Prints each cycle and the count; exit
status 1 if there is any.

    python tools/import_cycles.py [--module-level] [src/cnnlab]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path, path: Path, modules: set[str], module_level: bool) -> set[str]:
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    for node in tree.body if module_level else ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            if node.level and not node.module:  # `from . import x`: the submodule x (or a compiled one: skipped)
                targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            else:
                mod = f"{base}.{node.module}" if node.level else node.module
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
                parent = target.rpartition(".")[0]  # importing a.b.c runs a.b's __init__ first
                while parent:
                    if parent in modules and parent != name and not name.startswith(parent + "."):
                        found.add(parent)
                    parent = parent.rpartition(".")[0]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--module-level"]
    module_level = "--module-level" in sys.argv[1:]
    root = Path(args[0] if args else "src/cnnlab")
    files = sorted(root.rglob("*.py"))
    modules = {module_name(root, f) for f in files}
    graph = {module_name(root, f): imports(root, f, modules, module_level) for f in files}
    found = cycles(graph)
    for comp in found:
        print("cycle: " + " <-> ".join(comp))
    print(f"{len(found)} import cycle(s) among {len(modules)} modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
