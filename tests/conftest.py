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


@pytest.fixture(scope="session")
def gateway(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """One `cascade serve` for the whole session, shared by tests/integration and tests/faults."""
    from tests.integration.conftest import run_gateway

    yield from run_gateway(tiny_home, tmp_path_factory)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that change the shared gateway for good (a promoted model, a killed replica) run after the others,
    in the order their ``destructive(order=N)`` marker gives; tests with a Ray cluster of their own run last.

    A test under tests/integration says so with the ``integration`` marker too (`-m "not integration"` relies on
    it): one without it stops the run here, naming its module."""
    integration_dir = Path(__file__).resolve().parent / "integration"
    unmarked = sorted({item.nodeid.split("::")[0] for item in items
                       if item.path.is_relative_to(integration_dir) and item.get_closest_marker("integration") is None})
    if unmarked:
        raise pytest.UsageError(f"tests under tests/integration without the integration marker: {', '.join(unmarked)}")

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("own_cluster") is not None:
            return 1000  # after everything that uses the shared gateway: these stop its Ray
        marker = item.get_closest_marker("destructive")
        return 0 if marker is None else 1 + marker.kwargs.get("order", 0)

    items.sort(key=rank)


_shared_ray_stopped = False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before the first test with a Ray cluster of its own (they run last), stop the shared gateway's Ray and
    the HAProxy that a forced stop leaves behind. A hook, not a fixture: it must run before that test's
    module-scoped fixtures start their own cluster."""
    global _shared_ray_stopped
    if not _shared_ray_stopped and item.get_closest_marker("own_cluster") is not None:
        from tests.servers import stop_ray

        stop_ray()
        _shared_ray_stopped = True
