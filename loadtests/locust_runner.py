"""`cascade loadtest`: a bounded, headless Locust run against a gateway, with a pass/fail summary.

Prepares the traffic (movie snippets; the hard ones found over HTTP with ``route: student`` and the
live threshold), runs Locust as its own process, and writes the CSV files, the HTML report and
``summary.json`` into the output folder. Exits non-zero when the error rate or the p99 objective
is missed.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from pydantic import BaseModel, Field

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


class LoadTestSettings(BaseModel):
    host: str = "http://127.0.0.1:8000"
    users: int = Field(16, ge=1, le=256)
    spawn_rate: float = Field(16, gt=0)
    run_time_s: int = Field(30, ge=1, le=600, description="Bounded: at most ten minutes.")
    hard_share: float = Field(0.1, ge=0, le=1)
    max_error_rate: float = Field(0.01, ge=0, le=1)
    p99_ms: float = Field(500, gt=0)
    api_key: str | None = None
    texts: int = Field(400, ge=10)


class LoadTestSummary(BaseModel):
    requests: int
    failures: int
    error_rate: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    by_name: dict[str, dict[str, float]]
    passed: bool
    reasons: list[str]


def prepare_traffic(settings: LoadTestSettings, texts: list[str], path: Path) -> dict[str, int]:
    """Split texts into easy and hard by asking the gateway itself (student route, live threshold)."""
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    easy, hard = [], []
    with httpx.Client(base_url=settings.host, headers=headers, timeout=60) as client:
        threshold = client.get("/v1/status").raise_for_status().json()["threshold"]
        for start in range(0, len(texts), 32):
            chunk = texts[start : start + 32]
            answer = client.post("/v1/classify", json={"texts": chunk, "route": "student"}).raise_for_status()
            for text, result in zip(chunk, answer.json()["results"], strict=True):
                (hard if result["confidence"] < threshold else easy).append(text)
    path.write_text(json.dumps({"easy": easy, "hard": hard}))
    return {"easy": len(easy), "hard": len(hard)}


def read_summary(prefix: Path, settings: LoadTestSettings) -> LoadTestSummary:
    """Locust's ``_stats.csv``: one row per request name and an ``Aggregated`` row."""
    with open(f"{prefix}_stats.csv") as handle:
        rows = list(csv.DictReader(handle))
    total = next(row for row in rows if row["Name"] == "Aggregated")
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    error_rate = failures / requests if requests else 1.0
    p99 = float(total["99%"])
    reasons = []
    if requests == 0:
        reasons.append("no requests were made")
    if error_rate > settings.max_error_rate:
        reasons.append(f"error rate {error_rate:.2%} > {settings.max_error_rate:.2%}")
    if p99 > settings.p99_ms:
        reasons.append(f"p99 {p99:.0f} ms > {settings.p99_ms:.0f} ms")
    by_name = {row["Name"]: {"requests": float(row["Request Count"]), "failures": float(row["Failure Count"]),
                             "p50_ms": float(row["50%"]), "p99_ms": float(row["99%"])}
               for row in rows if row["Name"] != "Aggregated"}
    return LoadTestSummary(requests=requests, failures=failures, error_rate=error_rate,
                           requests_per_s=float(total["Requests/s"]), p50_ms=float(total["50%"]), p99_ms=p99,
                           by_name=by_name, passed=not reasons, reasons=reasons)


def run(settings: LoadTestSettings, texts: list[str], out: Path) -> LoadTestSummary:
    out.mkdir(parents=True, exist_ok=True)
    traffic = out / "traffic.json"
    counts = prepare_traffic(settings, texts, traffic)
    print(f"loadtest: {counts['easy']} easy and {counts['hard']} hard texts; {settings.users} users for "
          f"{settings.run_time_s} s against {settings.host}", flush=True)
    prefix = out / "locust"
    locust = str(Path(sys.executable).with_name("locust"))
    subprocess.run(
        [locust, "-f", str(LOCUSTFILE), "--headless", "--host", settings.host, "-u", str(settings.users),
         "-r", str(settings.spawn_rate), "-t", f"{settings.run_time_s}s", "--csv", str(prefix),
         "--html", str(out / "report.html"), "--only-summary", "--stop-timeout", "10", "--exit-code-on-error", "0",
         "--traffic", str(traffic), "--hard-share", str(settings.hard_share)],
        env=os.environ | ({"CASCADE_API_KEY": settings.api_key} if settings.api_key else {}), check=True,
        timeout=settings.run_time_s + 120,
    )
    summary = read_summary(prefix, settings)
    (out / "summary.json").write_text(summary.model_dump_json(indent=2))
    return summary
