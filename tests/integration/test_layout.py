"""pyproject's import-linter contracts hold on the tree and catch a forbidden import (`lint-imports`, a subprocess).
The import-cycle check, in-process with grimp: tests/unit/test_layout.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # runs lint-imports in a subprocess

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_every_contract() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


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
