"""dsvl2's modules import each other one way (loading -> processor -> model -> engine -> server/CLI), with no cycle.

The graph is read from the source, imports inside functions included, so a deferred import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dsvl2

PACKAGE = Path(dsvl2.__file__).parent
# The model's math: it may import only itself, the configs and the error types.
MODEL_MATH = ("dsvl2.model", "dsvl2.projector", "dsvl2.vision", "dsvl2.language")
MODEL_MATH_MAY_IMPORT = MODEL_MATH + ("dsvl2.config", "dsvl2.errors")
# What only the entry points above the engine may import.
TOP_LAYERS = ("dsvl2.cli", "dsvl2.serve", "dsvl2.eval", "dsvl2.train")


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def import_graph() -> dict[str, set[str]]:
    """Each dsvl2 module -> the dsvl2 modules it imports (a package's `__init__` stands for the package)."""
    modules = module_names()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        resolved = {resolve(t) for t in targets if t.split(".")[0] == "dsvl2"}
        # A module's own package (its __init__) is not a dependency edge back into it.
        graph[module] = {r for r in resolved if r and r != module and r != "dsvl2" and not module.startswith(r + ".")}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
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
                    cycles.append(sorted(component))
    return cycles


def test_cycle_finder_sees_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_dsvl2() -> None:
    graph = import_graph()
    assert len(graph) > 40, "the package's modules were not found"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_model_math_imports_only_model_math_and_configs() -> None:
    bad = [f"{module} imports {target}" for module, targets in import_graph().items() if _within(module, MODEL_MATH)
           for target in targets if not _within(target, MODEL_MATH_MAY_IMPORT)]
    assert not bad, "; ".join(bad)


def test_nothing_below_the_entry_points_imports_them() -> None:
    bad = [f"{module} imports {target}" for module, targets in import_graph().items()
           if not _within(module, TOP_LAYERS) for target in targets if _within(target, TOP_LAYERS)]
    assert not bad, "; ".join(bad)
