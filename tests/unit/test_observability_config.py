"""The Prometheus config, alert rules and Grafana dashboard shipped in deploy/: valid, and about real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.metrics import EXPORTED

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
HISTOGRAMS = {"cascade_request_latency_seconds", "cascade_inference_latency_seconds", "cascade_batch_size",
              "cascade_confidence"}
KNOWN = set(EXPORTED) | {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found: `make system-deps` installs Debian's prometheus")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(cascade_[a-z_]+)\b", expr))


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


def test_alerts_and_dashboard_use_only_exported_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    alert_metrics = set().union(*(metric_names(rule["expr"]) for group in rules["groups"] for rule in group["rules"]))
    dashboard = json.loads((DEPLOY / "grafana" / "cascade-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    dashboard_metrics = set().union(*(metric_names(e) for e in exprs))
    assert alert_metrics and dashboard_metrics
    assert alert_metrics <= KNOWN, alert_metrics - KNOWN
    assert dashboard_metrics <= KNOWN, dashboard_metrics - KNOWN
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for needed in ("p99", "teacher share", "cost", "degraded", "queue", "versions"):
        assert needed in titles
