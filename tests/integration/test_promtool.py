"""The shipped Prometheus config and alert rules, checked by promtool (a subprocess)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found: `make system-deps` installs Debian's prometheus")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.integration  # runs promtool in a subprocess
def test_promtool_accepts_config_and_rules() -> None:
    checked = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = promtool("check", "rules", str(DEPLOY / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 7 rules found" in rules.stdout


@pytest.mark.integration  # runs promtool in a subprocess
def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n"
                      "        expr: sum(rate(cascade_requests_total[5m]\n")
    assert promtool("check", "rules", str(broken)).returncode != 0
