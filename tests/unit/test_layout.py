"""The rooms' import rules hold: no module imports itself back through others (checked here with grimp, in-process).
pyproject's import-linter contracts (`lint-imports`, a subprocess): tests/integration/test_layout.py."""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every set of modules that import one another in a circle (strongly connected components of more than
    one module, or a module importing itself), each sorted; lazy imports inside functions count too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in graph.find_modules_directly_imported_by(module):
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_module_imports_itself_back() -> None:
    """No import cycle among the project's packages, at any depth: one module importing another that (through
    any chain) imports it again makes import order matter and hides a missing room between them."""
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False, cache_dir=None)
    cycles = import_cycles(graph)
    described = []
    for cycle in cycles:  # one circle through each: a direct import inside the cycle, then the way back
        first = cycle[0]
        second = min(graph.find_modules_directly_imported_by(first) & set(cycle))
        back = graph.find_shortest_chain(importer=second, imported=first) or (second, first)
        described.append(" -> ".join([first, *back]))
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_the_cycle_check_finds_a_cycle() -> None:
    """The check itself: a graph with a circle through three modules, and one with none."""
    graph = grimp.ImportGraph()
    for importer, imported in [("a.x", "a.y"), ("a.y", "a.z"), ("a.z", "a.x"), ("a.z", "a.w")]:
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph) == [["a.x", "a.y", "a.z"]]
    graph.remove_import(importer="a.z", imported="a.x")
    assert import_cycles(graph) == []
