"""Ray's private API is used in serving/_ray_compat.py only, and each name it reaches for exists in the pinned Ray."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from serving import _ray_compat

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bundle", "cli", "distill", "loadtests", "records", "routing", "serving")


def test_the_tested_ray_is_the_pinned_one() -> None:
    pin = re.search(r'"ray\[serve\]==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin is not None and pin.group(1) == _ray_compat.TESTED_RAY


def _private_uses(path: Path) -> list[str]:
    """Dotted names of ray that start with an underscore, imported or reached as attributes."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ray"):
            names = [node.module, *(alias.name for alias in node.names)]
            found += [name for name in names if any(part.startswith("_") for part in name.split("."))]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain = ast.unparse(node)
            if chain.startswith("ray."):
                found.append(chain)
    return found


def test_no_module_but_the_compat_one_uses_rays_private_api() -> None:
    offenders = {str(path.relative_to(ROOT)): uses for package in PACKAGES for path in (ROOT / package).rglob("*.py")
                 if path.name != "_ray_compat.py" and (uses := _private_uses(path))}
    assert offenders == {}
    assert _private_uses(ROOT / "serving" / "_ray_compat.py"), "the scan finds the compat module's own uses"


@pytest.mark.parametrize(("module", "name"), [
    ("ray.serve.context", "_get_serve_request_context"),
    ("ray.serve.context", "_get_internal_replica_context"),
    ("ray.serve._private.api", "serve_start"),
    ("ray._private.ray_constants", "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"),
    ("ray._private.worker", "_global_node"),
    ("ray.serve._private.constants", "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"),
])
def test_every_private_name_exists_in_the_installed_ray(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name)


def test_outside_a_replica_there_is_no_live_limit_and_no_request_id() -> None:
    assert _ray_compat.live_max_ongoing_requests() is None
    assert _ray_compat.serve_request_id() is None
