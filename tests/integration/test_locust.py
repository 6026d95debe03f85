"""`cascade loadtest`: a bounded headless Locust run against the running gateway on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CASCADE
from tests.integration.conftest import API_KEY, Gateway, apply_config

pytestmark = pytest.mark.integration


def loadtest(gateway: Gateway, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"CASCADE_API_KEY": API_KEY, "CASCADE_HOME": str(gateway.home)}
    return subprocess.run([CASCADE, "loadtest", "--host", gateway.url, "--users", "4", "--run-time", "6",
                           "--out", str(out), *extra], capture_output=True, text=True, env=env, timeout=300)


def test_locust_run_writes_a_summary_that_passes(gateway: Gateway, tmp_path: Path) -> None:
    apply_config(gateway)
    result = loadtest(gateway, tmp_path, "--p99-ms", "5000", "--hard-share", "0.2")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] and summary["requests"] > 20 and summary["failures"] == 0
    assert {"auto: 1 text", "auto: batch of 2-8"} <= set(summary["by_name"])
    assert (tmp_path / "report.html").stat().st_size > 1000
    assert (tmp_path / "locust_stats.csv").is_file()


def test_a_missed_objective_fails_the_run(gateway: Gateway, tmp_path: Path) -> None:
    apply_config(gateway)
    result = loadtest(gateway, tmp_path, "--p99-ms", "0.01")
    assert result.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["passed"] and any("p99" in reason for reason in summary["reasons"])
