"""The loop's evidence over real HTTP: /v1/feedback (labelled records, 4xx JSON on bad input) and the
sampling fields every queued record carries (shadow answers all kept, agreements too)."""

from __future__ import annotations

import time

import httpx
import pytest

from distill.data import load_movie_snippets
from records.queue import AnswerRecord, SqliteQueue
from tests.integration.conftest import Gateway, apply_config

pytestmark = pytest.mark.integration

SNIPPETS = load_movie_snippets()
TEXTS = SNIPPETS.texts[100:106]


def queued(gateway: Gateway, reason: str, texts: list[str], timeout_s: float = 30.0,
           since: float = 0.0) -> list[AnswerRecord]:
    """Records of ``reason`` for ``texts`` written after ``since`` (earlier tests may have sent the same texts),
    once the gateway's writer has flushed them."""
    deadline = time.monotonic() + timeout_s
    queue = SqliteQueue(gateway.home / "queue.db")
    try:
        while True:
            found = [r for r in queue.export() if r.reason == reason and r.text in texts and r.time >= since]
            if len(found) >= len(texts) or time.monotonic() > deadline:
                return found
            time.sleep(0.5)
    finally:
        queue.close()


@pytest.fixture()
def client(gateway: Gateway):
    apply_config(gateway)
    with gateway.client() as c:
        yield c


def test_feedback_queues_labelled_records_with_both_models_answers(gateway: Gateway, client: httpx.Client) -> None:
    names = [SNIPPETS.label_names[int(label)] for label in SNIPPETS.labels[100:106]]
    response = client.post("/v1/feedback", json={"texts": TEXTS, "labels": names})
    assert response.status_code == 200, response.text
    assert response.json()["queued"] == len(TEXTS)
    records = queued(gateway, "feedback", TEXTS)
    assert len(records) == len(TEXTS)
    by_text = {r.text: r for r in records}
    for text, name in zip(TEXTS, names, strict=True):
        record = by_text[text]
        assert SNIPPETS.label_names[record.label] == name
        assert record.teacher_probs is not None and record.confidence is not None and record.threshold is not None


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"texts": TEXTS[:2], "labels": ["no-such-label", "another"]}, 422, "unknown labels"),
    ({"texts": TEXTS[:2], "labels": [SNIPPETS.label_names[0]]}, 422, "2 texts but 1 labels"),
    ({"texts": TEXTS[:1]}, 422, "invalid request"),
    ({"texts": [" "], "labels": [SNIPPETS.label_names[0]]}, 422, "texts[0] is empty"),
    ({"texts": TEXTS[:1], "labels": [SNIPPETS.label_names[0]], "extra": 1}, 422, "invalid request"),
    ({"texts": ["x"] * 1000, "labels": [SNIPPETS.label_names[0]] * 1000}, 422, "too many texts"),
])
def test_bad_feedback_is_a_4xx_json_answer(client: httpx.Client, body: dict, status: int, says: str) -> None:
    response = client.post("/v1/feedback", json=body)
    assert response.status_code == status, response.text
    answer = response.json()
    assert says in answer["error"] and answer["id"]


def test_feedback_needs_the_api_key_and_valid_json(gateway: Gateway, client: httpx.Client) -> None:
    body = {"texts": TEXTS[:1], "labels": [SNIPPETS.label_names[0]]}
    unauthorised = httpx.post(f"{gateway.url}/v1/feedback", json=body, timeout=30)
    assert unauthorised.status_code == 401 and "API key" in unauthorised.json()["error"]
    broken = client.post("/v1/feedback", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]


def test_shadow_answers_are_all_kept_with_their_sampling_probability(gateway: Gateway) -> None:
    # Every student-served text shadowed; fallback agreements would be dropped (keep: disagreements).
    apply_config(gateway, shadow={"share": 1.0}, queue={"keep": "disagreements"}, routing={"threshold": 0.0})
    texts = SNIPPETS.texts[200:212]
    sent = time.time()
    with gateway.client() as client:
        client.post("/v1/classify", json={"texts": texts}).raise_for_status()
    records = queued(gateway, "shadow", texts, since=sent)
    assert len(records) == len(texts), "every shadow answer is kept, agreements too"
    assert any(not r.disagree for r in records)
    assert all(r.sampling_probability == 1.0 and r.threshold == 0.0 and r.confidence is not None for r in records)
