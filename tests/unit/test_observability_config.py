"""The Prometheus config, alert rules and Grafana dashboard shipped in deploy/: valid, and about real metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from serving.metrics import EXPORTED

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
HISTOGRAMS = {"cascade_request_latency_seconds", "cascade_inference_latency_seconds", "cascade_batch_size",
              "cascade_confidence"}
KNOWN = set(EXPORTED) | {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(cascade_[a-z_]+)\b", expr))


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
