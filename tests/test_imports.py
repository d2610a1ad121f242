"""The package's import graph, read from the source (every import, also those inside functions): the
subpackages follow the pipeline without cycles, no two modules import each other, and no private
name (`_x`) is imported from another subpackage."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "latentkv"


def import_edges() -> list[tuple[str, str, str]]:
    """(importing module, imported module, imported name or "") for every latentkv import."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    edges = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "latentkv":
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.append((name, sub, "") if sub in modules else (name, target, alias.name))
            elif isinstance(node, ast.Import):
                edges.extend((name, a.name, "") for a in node.names if a.name.split(".")[0] == "latentkv")
    return edges


def subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_private_name_crosses_a_subpackage():
    """Guards the boundaries: what another subpackage uses is public (dunders such as __version__ are)."""
    crossing = [(a, f"{b}.{n}") for a, b, n in import_edges()
                if n.startswith("_") and not n.startswith("__") and subpackage(a) != subpackage(b)]
    assert not crossing, crossing


def test_subpackages_import_without_cycles():
    """Guards the layering load -> calibrate -> convert -> finetune -> eval / runtime: the graph of
    subpackages (an edge wherever any module of one imports any module of the other) has no cycle."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in import_edges():
        if subpackage(a) != subpackage(b) and subpackage(b) != "latentkv":
            graph.setdefault(subpackage(a), set()).add(subpackage(b))
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [node]):
                return True
        state[node] = 2
        return False

    assert not any(visit(n, []) for n in sorted(graph) if state.get(n) is None), " -> ".join(cycle)


def test_no_two_modules_import_each_other():
    edges = {(a, b) for a, b, _ in import_edges() if a != b}
    mutual = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert not mutual, mutual
