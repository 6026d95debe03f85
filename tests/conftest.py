"""Shared fixtures: one tiny bundle built by the real pipeline (real weights, real data, tiny config)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CASCADE = str(Path(sys.executable).with_name("cascade"))


def run_cli(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the installed `cascade` command as a user would."""
    env = os.environ | {"CASCADE_HOME": str(home)}
    result = subprocess.run([CASCADE, *args], capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"cascade {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model home holding one tiny bundle, made by `cascade build --tiny` once per test session.

    ``CASCADE_TEST_TINY_HOME`` (a developer's shortcut, never set in CI) copies a tiny home built earlier
    instead, so a developer iterating on serving code does not rebuild the same bundle every run.
    """
    home = tmp_path_factory.mktemp("cascade-home")
    prebuilt = os.environ.get("CASCADE_TEST_TINY_HOME")
    if prebuilt:
        shutil.copytree(Path(prebuilt) / "registry", home / "registry")
        return home
    run_cli("build", "--tiny", home=home)
    return home


@pytest.fixture()
def tiny_home_copy(tiny_home: Path, tmp_path: Path) -> Path:
    """A private copy for tests that damage or change the registry."""
    target = tmp_path / "home"
    shutil.copytree(tiny_home / "registry", target / "registry")
    return target
