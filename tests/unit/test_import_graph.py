"""The `router` package's import graph has no cycle, so each module can be read (and loaded)
after the ones it depends on.

Edges are the imports at a module's top level. Imports under `if TYPE_CHECKING:` are a
dependency for the reader too: `import_graph(type_checking=True)` counts them. Imports inside
functions are not edges: they are the documented way to reach a heavy or optional module when
used.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROUTER = Path(__file__).resolve().parents[2] / "router"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROUTER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def import_graph(*, type_checking: bool = False) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROUTER.rglob("*.py") if "v1" not in p.parts}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If):
                if not type_checking or "TYPE_CHECKING" not in ast.unparse(node.test):
                    continue
                statements = node.body
            else:
                statements = [node]
            for statement in statements:
                targets: list[str] = []
                if isinstance(statement, ast.ImportFrom) and statement.module \
                        and statement.level == 0:
                    targets = [statement.module,
                               *(f"{statement.module}.{alias.name}" for alias in statement.names)]
                elif isinstance(statement, ast.Import):
                    targets = [alias.name for alias in statement.names]
                graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

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
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_router_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "router.acp.config" in graph["router.config"], "the scan found the imports"
    assert cycles(graph) == []


def test_no_import_cycle_even_counting_imports_for_type_checkers() -> None:
    """A cycle hidden under `if TYPE_CHECKING:` still makes two modules readable only
    together; a lower module names what it needs of a higher one with a Protocol."""
    graph = import_graph(type_checking=True)
    assert "router.acp.frontdoor" in graph["router.app"], "TYPE_CHECKING imports were scanned"
    assert cycles(graph) == []


def test_imports_for_type_checkers_are_edges_when_asked_for() -> None:
    runtime, typed = import_graph(), import_graph(type_checking=True)
    assert runtime.keys() == typed.keys()
    assert all(runtime[name] <= edges for name, edges in typed.items())


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
