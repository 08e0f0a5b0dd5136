"""The launcher's modules import one another one way: no circle, counting every import a module
names (inside functions and under `if TYPE_CHECKING:` too), read from the source, not run."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "vllm_launcher"
ROOT = Path(__file__).resolve().parent.parent / "launcher" / PACKAGE


def modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file, a package by its __init__.py."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports. Importing pkg.sub from outside pkg runs pkg's
    __init__ first, so it counts as importing pkg too; from inside pkg, pkg is already running."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            named.add(module)
            named.update(f"{module}.{alias.name}" for alias in node.names)   # `from . import sub`
    edges = set()
    for target in named & known.keys():
        parts = target.split(".")
        for depth in range(1, len(parts) + 1):
            outer = ".".join(parts[:depth])
            if outer in known and outer != name and (outer == target or not name.startswith(outer + ".")):
                edges.add(outer)
    return edges


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each group of modules that reach one another (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    known = modules(root, package)
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 20 and graph[f"{PACKAGE}.cli"], "the walk found the package's modules and imports"
    found = circles(graph)
    assert not found, "import circles (each line: modules that import one another):\n" + "\n".join(
        " <-> ".join(group) + ": " + "; ".join(f"{a} -> {', '.join(sorted(graph[a] & set(group)))}" for a in group)
        for group in found)


def test_the_walk_sees_a_typing_only_circle(tmp_path):
    """A circle closed only under TYPE_CHECKING, by a relative import inside a subpackage, is found."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .low import Low\n")
    (package / "sub" / "low.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..high import High\nclass Low: ...\n")
    (package / "high.py").write_text("def f():\n    from .sub import low\n")
    graph = import_graph(package, "pkg")
    assert graph["pkg.high"] == {"pkg.sub", "pkg.sub.low"}
    assert circles(graph) == [["pkg.high", "pkg.sub", "pkg.sub.low"]]
    (package / "sub" / "low.py").write_text("class Low: ...\n")
    assert circles(import_graph(package, "pkg")) == []
