"""The package's import structure, read from the source with ``ast`` (imports inside functions included).

No module imports a ``_private`` name from another package, and no new import circle appears: the circles
that remain are listed here and may only shrink (the issue on one public API removes them). A circle that
disappears must be taken off the list, so the list stays what the code is.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Import circles (strongly connected modules) left on 2026-12-05, each as its smallest module name and size.
KNOWN_CIRCLES = {
    ("vitcompress.artifact", 21),  # artifact <-> the method registry and every method family
    ("vitcompress.export.onnx", 4),  # measure <-> export
    ("vitcompress.models", 2),  # models <-> models.hf
    ("vitcompress.study.executors", 2),  # study.runner <-> study.executors
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "vitcompress").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> modules of this package it imports; and the cross-package private imports found."""
    graph: dict[str, set[str]] = defaultdict(set)
    private = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "vitcompress":
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    graph[name].add(full if full in modules else target)
                    top = lambda module: module.split(".")[1] if module.count(".") else ""  # noqa: E731
                    if alias.name.startswith("_") and not alias.name.startswith("__") and top(name) != top(target):
                        private.append(f"{name} imports {full}")
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
    return graph, private


def _circles(graph: dict[str, set[str]], nodes: list[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_module_imports_a_private_name_of_another_package() -> None:
    _, private = _imports(_modules())
    assert private == []


def test_no_new_import_circle() -> None:
    modules = _modules()
    graph, _ = _imports(modules)
    circles = {(c[0], len(c)) for c in _circles(graph, sorted(modules))}
    assert circles - KNOWN_CIRCLES == set(), f"a new import circle: {circles - KNOWN_CIRCLES}"
    assert KNOWN_CIRCLES - circles == set(), f"a circle is gone (or changed): update KNOWN_CIRCLES {circles}"


def test_the_circle_finder_finds_a_planted_circle() -> None:
    graph = defaultdict(set, {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert _circles(graph, ["a", "b", "c", "d"]) == [["a", "b", "c"]]
