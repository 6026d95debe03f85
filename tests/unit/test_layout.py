"""The rooms' import rules hold: no module imports itself back through others (checked here with grimp), and
pyproject's import-linter contracts hold and catch a forbidden import (those run `lint-imports`, a subprocess)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
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


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.integration  # runs lint-imports in a subprocess
def test_the_tree_keeps_every_contract() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration  # runs lint-imports in a subprocess
def test_a_training_module_importing_serving_breaks_a_contract(tmp_path: Path) -> None:
    """A copy of the tree where distill imports serving: lint-imports must fail and name the contract."""
    for name in ("bundle", "cli", "records", "serving", "routing", "distill", "loadtests"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "distill" / "leak.py").write_text("from serving import settings\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "the offline side never imports serving" in result.stdout
    assert "distill.leak -> serving.settings" in result.stdout
