"""A real Prometheus (Debian's) scrapes the running gateway with the project's config and relabelling."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from distill.data import load_movie_snippets
from serving.settings import CostSettings
from tests.integration.conftest import Gateway, apply_config
from tests.servers import free_port

pytestmark = pytest.mark.integration
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def prometheus(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """deploy/prometheus.yml with the node list pointed at this gateway's metrics port on 127.0.0.1."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: `make system-deps` installs it")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["rule_files"] = [str(DEPLOY / "alerts.yml")]
    job = config["scrape_configs"][0]
    job.pop("file_sd_configs")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{gateway.metrics_port}"]}]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                                f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=(workdir / "log").open("w"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (workdir / "log").read_text()[-2000:]
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(url: str, expr: str) -> float | None:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def wait_for(url: str, expr: str, predicate, timeout_s: float = 90) -> float | None:
    """Ray's agent exports every few seconds and Prometheus scrapes every second: poll until it shows."""
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = query(url, expr)
        if value is not None and predicate(value):
            return value
        time.sleep(1)
    return value


def test_prometheus_sees_counts_latency_and_cost(gateway: Gateway, prometheus: str) -> None:
    apply_config(gateway, shadow={"share": 0.0})
    texts = load_movie_snippets().texts[100:130]
    served = 'sum(cascade_requests_total{served_by="%s"}) or vector(0)'
    with gateway.client() as client:
        client.post("/v1/classify", json={"texts": texts[:1], "route": "student"}).raise_for_status()
    # The series exist once something was served; take the baseline once Prometheus has them.
    assert wait_for(prometheus, served % "student", lambda v: v > 0) is not None
    time.sleep(12)  # let earlier tests' traffic finish reaching Prometheus
    before = {who: query(prometheus, served % who) or 0.0 for who in ("student", "teacher")}
    cost_before = {m: query(prometheus, f'sum(cascade_cost_dollars_total{{model="{m}"}}) or vector(0)') or 0.0
                   for m in ("student", "teacher")}
    only_before = query(prometheus, "sum(cascade_teacher_only_cost_dollars_total) or vector(0)") or 0.0
    student_n, teacher_n = 24, 6
    with gateway.client() as client:
        for text in texts[:student_n]:
            assert client.post("/v1/classify", json={"texts": [text], "route": "student"}).status_code == 200
        for text in texts[student_n:student_n + teacher_n]:
            answer = client.post("/v1/classify", json={"texts": [text], "route": "teacher"}).json()
            assert answer["results"][0]["served_by"] == "teacher"
    after_student = wait_for(prometheus, served % "student", lambda v: v >= before["student"] + student_n)
    after_teacher = wait_for(prometheus, served % "teacher", lambda v: v >= before["teacher"] + teacher_n)
    assert after_student == before["student"] + student_n
    assert after_teacher == before["teacher"] + teacher_n

    prices = CostSettings()
    total = student_n + teacher_n
    student_cost = wait_for(prometheus, 'sum(cascade_cost_dollars_total{model="student"})',
                            lambda v: v >= cost_before["student"] + total * prices.student_per_1k / 1000 - 1e-9)
    teacher_cost = wait_for(prometheus, 'sum(cascade_cost_dollars_total{model="teacher"})',
                            lambda v: v >= cost_before["teacher"] + teacher_n * prices.teacher_per_1k / 1000 - 1e-9)
    only = wait_for(prometheus, "sum(cascade_teacher_only_cost_dollars_total)",
                    lambda v: v >= only_before + total * prices.teacher_per_1k / 1000 - 1e-9)
    assert student_cost == pytest.approx(cost_before["student"] + total * prices.student_per_1k / 1000, rel=1e-6)
    assert teacher_cost == pytest.approx(cost_before["teacher"] + teacher_n * prices.teacher_per_1k / 1000, rel=1e-6)
    assert only == pytest.approx(only_before + total * prices.teacher_per_1k / 1000, rel=1e-6)

    p99 = query(prometheus, 'histogram_quantile(0.99, sum by (le) (cascade_request_latency_seconds_bucket'
                            '{served_by="student"}))')
    assert p99 is not None and 0 < p99 < 10
    assert query(prometheus, "max(cascade_model_info)") == 1
    threshold = wait_for(prometheus, "max(cascade_threshold)", lambda v: v >= 0)
    assert threshold is not None


def test_the_teacher_batches_what_queued_while_it_was_busy(gateway: Gateway, prometheus: str) -> None:
    """Concurrent teacher requests share model calls: fewer teacher calls than texts."""
    apply_config(gateway, shadow={"share": 0.0})
    calls = 'sum(cascade_batch_size_count{model="teacher"}) or vector(0)'
    texts_seen = 'sum(cascade_model_texts_total{model="teacher"}) or vector(0)'
    time.sleep(12)  # earlier traffic reaches Prometheus first
    calls_before, texts_before = query(prometheus, calls) or 0.0, query(prometheus, texts_seen) or 0.0
    texts = load_movie_snippets().texts[200:212]  # 12 at once: under both replicas' teacher caps (8 each)

    def ask(text: str) -> dict:
        with gateway.client() as client:
            return client.post("/v1/classify", json={"texts": [text], "route": "teacher"}).json()

    with ThreadPoolExecutor(len(texts)) as pool:
        answers = list(pool.map(ask, texts))
    assert all(a["results"][0]["served_by"] == "teacher" for a in answers)
    assert wait_for(prometheus, texts_seen, lambda v: v >= texts_before + len(texts)) == texts_before + len(texts)
    time.sleep(8)  # the call counter is a separate series: give it one more export and scrape
    calls_made = (query(prometheus, calls) or 0.0) - calls_before
    assert 1 <= calls_made < len(texts)
