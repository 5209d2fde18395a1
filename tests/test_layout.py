"""The package's import graph: no cycle (imports inside functions count), and layers point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "transferlab"
# Bottom to top: a module may import only from its own layer or the layers before it.
LAYERS = [
    "errors tags cache preflight console",
    "data",
    "transfer",
    "config schema overrides",
    "tracking",
    "jobs",
    "studies",
    "cli",
]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> transferlab modules it imports anywhere in its body (functions included)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t in modules and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, found, counter = {}, {}, [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while (w := stack.pop()) != v:
                group.append(w)
            if group:
                found.append(sorted([v, *group]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    name = module.split(".")[1] if "." in module else ""
    return next((i for i, layer in enumerate(LAYERS) if name in layer.split()), -1)


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_cycle_finder_sees_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "transferlab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from transferlab import b\n")
    (pkg / "b.py").write_text("def f():\n    from transferlab.a import thing\n")
    (pkg / "c.py").write_text("import transferlab.a\n")
    assert cycles(import_graph(pkg)) == [["transferlab.a", "transferlab.b"]]


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_imports_point_down_the_layers(module: str) -> None:
    """A lower layer never calls up: data never imports transfer, transfer never imports jobs, ..."""
    if layer_of(module) < 0:
        pytest.skip("package root")
    upward = sorted(t for t in import_graph()[module] if layer_of(t) > layer_of(module))
    assert upward == [], f"{module} imports a higher layer"
