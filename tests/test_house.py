"""The house rules, measured on the source: imports run one way, no module takes another's private name,
functions short enough to read at once (issue 17). Read with `ast`, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "tuneloop"
MAX_LINES = 60
LONGER = {"loop.train_loop": 100}  # the one loop, every step of it in sight


def modules() -> dict[str, ast.Module]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): ast.parse(p.read_text(encoding="utf-8"))
            for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST) -> str | None:
    """The tuneloop module an import names, without the package prefix."""
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tuneloop.") and node.level == 0:
        return node.module.removeprefix("tuneloop.")
    return None


def import_graph() -> dict[str, set[str]]:
    trees, graph = modules(), {}
    for name, tree in trees.items():
        edges = set()
        for node in ast.walk(tree):
            target = imported(node)
            if target is None and isinstance(node, ast.Import):
                target = next((a.name.removeprefix("tuneloop.") for a in node.names if a.name.startswith("tuneloop.")), None)
            if target in trees and target != name:
                edges.add(target)
            if isinstance(node, ast.ImportFrom) and node.module == "tuneloop":  # from tuneloop import loop
                edges |= {a.name for a in node.names if a.name in trees}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_import_graph_is_read():
    graph = import_graph()
    assert "loop" in graph["recipe"] and "config" in graph["cli"]  # the reader sees real edges


def test_no_import_cycle_among_tuneloops_modules():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_a_cycle_would_be_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_another_modules_private_name():
    offences = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tuneloop"):
                offences += [f"{name}: from {node.module} import {a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   and (getattr(node, "module", None) == "tuneloop" or isinstance(node, ast.Import))
                   for a in node.names if isinstance(node, ast.ImportFrom) or a.name.startswith("tuneloop")}
        offences += [f"{name}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                     if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                     and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert offences == []


def test_functions_fit_on_a_screen():
    lengths = {}
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{name}.{node.name}"] = max(lengths.get(f"{name}.{node.name}", 0),
                                                     node.end_lineno - node.lineno + 1)
    too_long = {f: n for f, n in lengths.items() if n > LONGER.get(f, MAX_LINES)}
    assert too_long == {}
    assert 0 < lengths["loop.train_loop"] <= LONGER["loop.train_loop"]
