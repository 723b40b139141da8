"""Imports point one way: the layers of docs/ARCHITECTURE.md, bottom-up, with no cycle between folders or
files (imports inside functions included), and no import of the package inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

SRC = REPO / "src"
# Bottom-up. A module may import its own layer and any layer below, never one above.
LAYERS = [
    {"errors", "io", "records", "progress"},
    {"config", "accelerators"},
    {"wsi"},
    {"data", "models"},
    {"compress"},
    {"artifacts"},
    {"measure"},
    {"modules"},
    {"slides"},
    {"pipelines"},
    {
        "train",
        "slide",
        "bench",
        "compare",
        "mil",
        "sweep",
        "jobs",
        "tracking",
        "overrides",
        "requeue",
        "deploy",
    },
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "patholite").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of the package in a module."""
    tree = ast.parse(path.read_text())
    in_function = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(fn)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name imported from a module: the module
                target = target.rpartition(".")[0]
            if target and target != name and target != "patholite":
                out.append((target, node.lineno, id(node) in in_function))
    return sorted(set(out))


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {t for t, _, _ in imports(name, path, known)} for name, path in known.items()}


def folder(module: str) -> str:
    return module.split(".")[1]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_every_folder_is_in_a_layer():
    assert {folder(m) for m in modules() if m != "patholite"} <= set(LAYER)


def test_imports_point_down_the_layers():
    known = modules()
    upward = [
        f"{name}:{line} imports {target}"
        for name, path in known.items()
        if name != "patholite"
        for target, line, _ in imports(name, path, known)
        if LAYER[folder(target)] > LAYER[folder(name)]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_files_or_folders():
    edges = graph()
    folders: dict[str, set[str]] = {}
    for a, targets in edges.items():
        if a == "patholite":
            continue
        folders.setdefault(folder(a), set()).update(folder(b) for b in targets if folder(b) != folder(a))
    assert cycles(edges) == [] and cycles(folders) == []


def test_the_package_is_never_imported_inside_a_function():
    known = modules()
    hidden = [
        f"{name}:{line} imports {target} inside a function"
        for name, path in known.items()
        for target, line, inside in imports(name, path, known)
        if inside
    ]
    assert not hidden, "\n".join(hidden)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
