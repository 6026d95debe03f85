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


def test_the_locustfile_runs_as_locust_users_run_it(gateway: Gateway, tmp_path: Path) -> None:
    """`locust -f loadtests/locustfile.py --host URL`: the shipped traffic, no environment variable needed."""
    apply_config(gateway)
    locust = str(Path(CASCADE).with_name("locust"))
    env = {k: v for k, v in os.environ.items() if k not in ("CASCADE_TRAFFIC", "CASCADE_API_KEY")}
    result = subprocess.run([locust, "-f", "loadtests/locustfile.py", "--host", gateway.url, "--headless", "-u", "2",
                             "-r", "2", "-t", "5s", "--api-key", API_KEY, "--csv", str(tmp_path / "plain"),
                             "--only-summary", "--exit-code-on-error", "1"],
                            capture_output=True, text=True, env=env, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = (tmp_path / "plain_stats.csv").read_text().splitlines()
    aggregated = next(row for row in rows if ",Aggregated," in row).split(",")
    assert int(aggregated[2]) > 5 and int(aggregated[3]) == 0  # requests made, none failed
