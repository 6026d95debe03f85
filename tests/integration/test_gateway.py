"""The gateway over real HTTP: a real Ray Serve (HAProxy ingress) on 127.0.0.1 serving the tiny bundle."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from distill.data import load_movie_snippets
from tests.integration.conftest import API_KEY, Gateway, apply_config

pytestmark = pytest.mark.integration

TEXTS = load_movie_snippets().texts[:24]


@pytest.fixture()
def client(gateway: Gateway):
    apply_config(gateway)
    with gateway.client() as c:
        yield c


def classify(client: httpx.Client, texts: list[str], route: str = "auto") -> list[dict]:
    response = client.post("/v1/classify", json={"texts": texts, "route": route})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == response.headers["x-request-id"]
    return body["results"]


def test_answers_in_input_order_with_the_documented_fields(client: httpx.Client) -> None:
    results = classify(client, TEXTS[:5], route="student")
    alone = [classify(client, [t], route="student")[0] for t in TEXTS[:5]]
    assert [r["label"] for r in results] == [r["label"] for r in alone]
    for result in results:
        assert set(result) == {"label", "probabilities", "confidence", "served_by", "degraded", "reason",
                               "student_version", "teacher_version"}
        assert abs(sum(result["probabilities"].values()) - 1) < 1e-6
        assert result["served_by"] == "student" and not result["degraded"]


def test_confident_texts_stay_on_the_student_and_unsure_ones_go_to_the_teacher(
        gateway: Gateway, client: httpx.Client) -> None:
    confidences = sorted(r["confidence"] for r in classify(client, TEXTS, route="student"))
    threshold = confidences[len(confidences) // 2]
    apply_config(gateway, routing={"threshold": threshold})
    results = classify(client, TEXTS)
    student = classify(client, TEXTS, route="student")
    for auto, alone in zip(results, student, strict=True):
        expected = "student" if alone["confidence"] >= threshold else "teacher"
        assert auto["served_by"] == expected and not auto["degraded"]
    assert {r["served_by"] for r in results} == {"student", "teacher"}


def test_a_forced_high_threshold_sends_everything_to_the_teacher(gateway: Gateway, client: httpx.Client) -> None:
    apply_config(gateway, routing={"threshold": 1.0})
    results = classify(client, TEXTS[:8])
    assert all(r["served_by"] == "teacher" for r in results), [(r["served_by"], r["reason"]) for r in results]
    teacher = classify(client, TEXTS[:8], route="teacher")
    for auto, forced in zip(results, teacher, strict=True):
        assert auto["probabilities"] == pytest.approx(forced["probabilities"], abs=1e-4)


@pytest.mark.parametrize(
    ("teacher", "reason"),
    [({"timeout_s": 0.0005}, "teacher_timeout"), ({"max_concurrency": 0}, "teacher_saturated"),
     ({"max_share": 0.0}, "teacher_budget")],
)
def test_a_slow_busy_or_exhausted_teacher_degrades_to_the_student(
        gateway: Gateway, client: httpx.Client, teacher: dict, reason: str) -> None:
    apply_config(gateway, routing={"threshold": 1.0}, teacher=teacher | {"budget_window_s": 10.0})
    results = classify(client, TEXTS[:20])
    student = classify(client, TEXTS[:20], route="student")
    degraded = [r for r in results if r["degraded"]]
    assert degraded, results
    for result in degraded:
        assert result["served_by"] == "student" and result["reason"] == reason
    for result, alone in zip(results, student, strict=True):
        if result["degraded"]:
            assert result["label"] == alone["label"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"texts": ["ok"], "route": "oracle"}', 400, "unknown route"),
        (b'{"texts": []}', 422, "invalid request"),
        (b'{"texts": "a string"}', 422, "invalid request"),
        (b'{"texts": [1, 2]}', 422, "invalid request"),
        (b'{"texts": ["  "]}', 422, "texts[0] is empty"),
        (b'{"texts": ["x"], "extra": 1}', 422, "invalid request"),
        (b"[1, 2]", 422, "invalid request"),
        (b"", 422, "empty request body"),
        (b'{"texts": ["' + b"a" * 2001 + b'"]}', 422, "over 2000"),
        (b'{"texts": ' + str(["t"] * 65).replace("'", '"').encode() + b"}", 422, "too many texts"),
        (b'{"texts": ["' + b"a" * 300_000 + b'"]}', 413, "request body over"),
    ],
)
def test_malformed_requests_get_a_json_4xx_and_the_service_keeps_answering(
        client: httpx.Client, body: bytes, status: int, message: str) -> None:
    response = client.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()
    assert message in error["error"] and error["id"]
    assert classify(client, ["still alive?"])[0]["label"]


def test_api_key_is_required_except_for_health(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as anonymous:
        assert anonymous.post("/v1/classify", json={"texts": ["x"]}).status_code == 401
        wrong = anonymous.post("/v1/classify", json={"texts": ["x"]}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "missing or invalid API key"
        assert anonymous.get("/v2/health/live").json() == {"live": True}
        assert anonymous.get("/v2/health/ready").status_code == 200
        ok = anonymous.post("/v1/classify", json={"texts": ["x"]}, headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200


def test_request_id_is_echoed(client: httpx.Client) -> None:
    response = client.post("/v1/classify", json={"texts": ["x"]}, headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123" and response.json()["id"] == "abc-123"


def test_open_inference_protocol(client: httpx.Client) -> None:
    metadata = client.get("/v2/models/cascade").json()
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    body = {"id": "req-1", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS[:2]}]}
    answer = client.post("/v2/models/student/infer", json=body).json()
    assert answer["id"] == "req-1" and answer["model_name"] == "student"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["probabilities"]["shape"] == [2, 2] and len(outputs["probabilities"]["data"]) == 4
    assert outputs["label"]["data"] == [r["label"] for r in classify(client, TEXTS[:2], route="student")]
    assert client.get("/v2/models/nope").status_code == 404
    assert client.post("/v2/models/nope/infer", json=body).status_code == 404
    bad = client.post("/v2/models/cascade/infer", json={"inputs": [{"name": "t", "shape": [1], "datatype": "FP32",
                                                                      "data": [1.0]}]})
    assert bad.status_code == 422 and "BYTES" in bad.json()["error"]
    assert client.get("/docs").status_code == 200 and "/v1/classify" in client.get("/openapi.json").text


def test_overload_is_refused_at_once_with_retry_after(gateway: Gateway, client: httpx.Client) -> None:
    from serving.app import DEPLOYMENT_OPTIONS

    # The admission limit is derived from Ray's max_ongoing_requests: a headroom of all but one leaves one.
    apply_config(gateway, limits={"admission_headroom": DEPLOYMENT_OPTIONS["Gateway"]["max_ongoing_requests"] - 1})

    def call(_: int) -> httpx.Response:
        return client.post("/v1/classify", json={"texts": TEXTS[:16], "route": "teacher"})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(call, range(48)))
    codes = {r.status_code for r in responses}
    assert codes <= {200, 503} and 503 in codes and 200 in codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"].startswith(
        "over capacity, retry later")


def test_deeply_nested_json_is_a_json_400_not_a_500(client: httpx.Client) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/v1/classify", "/v2/models/cascade/infer"):
        answer = client.post(path, content=deep, headers={"content-type": "application/json"})
        assert answer.status_code == 400, (path, answer.status_code, answer.text[:200])
        assert "deeper than" in answer.json()["error"]
    assert client.post("/v1/classify", json={"texts": TEXTS[:1]}).status_code == 200


def test_bench_load_generator_measures_the_gateway(gateway: Gateway) -> None:
    """The wrk runner behind `cascade bench`: a short, bounded run on 127.0.0.1 with the real parser."""
    from loadtests.bench import run_wrk

    apply_config(gateway)
    percentiles: dict[float, float] = {}
    rps, p50, p99, errors = run_wrk(gateway.url, TEXTS, "student", concurrency=4, seconds=2, api_key=API_KEY,
                                    percentiles=percentiles)
    assert rps > 0 and 0 < p50 <= p99 and errors == 0, (rps, p50, p99, errors)
    values = [percentiles[p] for p in sorted(percentiles)]
    assert {50.0, 95.0, 99.0} <= set(percentiles) and values == sorted(values)  # the report's CDF
    _, _, _, refused = run_wrk(gateway.url, TEXTS, "student", concurrency=2, seconds=1, api_key="wrong")
    assert refused > 0  # 401s are counted as errors, so a broken run cannot pass for a fast one


def _replica_niceness(deployment: str) -> list[int]:
    """Niceness of this machine's Serve replicas of one deployment, found by Ray's process titles."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(
                    f"ray::ServeReplica:cascade:{deployment}".encode()):
                found.append(os.getpriority(os.PRIO_PROCESS, int(entry.name)))
        except OSError:  # the process ended while we looked
            continue
    return found


def test_the_teacher_runs_at_a_higher_cpu_priority_than_the_gateway(gateway: Gateway) -> None:
    """A deferred text has the least slack: on a shared node the teacher gets the core first."""
    from serving.deployment import TEACHER_NICENESS

    teacher, gateways = _replica_niceness("Teacher"), _replica_niceness("Gateway")
    assert teacher and gateways, (teacher, gateways)
    assert set(teacher) == {TEACHER_NICENESS} and min(gateways) > TEACHER_NICENESS, (teacher, gateways)


# Last: the teacher replica is restarted by Serve afterwards, which takes a while.
@pytest.mark.destructive(order=9)
def test_a_killed_teacher_yields_degraded_answers_not_errors(gateway: Gateway, client: httpx.Client) -> None:
    apply_config(gateway, routing={"threshold": 1.0}, teacher={"timeout_s": 1.0})
    kill = (
        "import ray\n"
        "ray.init(address='auto', namespace='serve', log_to_driver=False)\n"
        "names = [a['name'] for a in ray.util.list_named_actors(all_namespaces=True) if 'Teacher' in a['name']]\n"
        "assert names, 'no teacher replica found'\n"
        "for name in names: ray.kill(ray.get_actor(name, namespace='serve'), no_restart=True)\n"
    )
    subprocess.run([sys.executable, "-c", kill], check=True, capture_output=True, timeout=120)
    statuses, reasons = [], set()
    for _ in range(10):
        response = client.post("/v1/classify", json={"texts": TEXTS[:3]})
        statuses.append(response.status_code)
        reasons |= {r["reason"] for r in response.json()["results"] if r["degraded"]}
    assert statuses == [200] * 10
    assert reasons & {"teacher_error", "teacher_timeout"}
