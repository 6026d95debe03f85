"""The gateway resolves the distillation queue as the CLI does: ``CASCADE_QUEUE_URL`` first.

Before, the gateway ignored the variable and wrote beside the registry while `cascade distill` read the queue the
variable named, so the two used different queues without a word. Here a `cascade serve` of its own runs with the
variable pointing at a fresh SQLite file: what the gateway queues lands there (and not in the default queue beside
the registry), and `cascade queue export` under the same variable reads those very records.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from distill.data import load_movie_snippets
from records.queue import AnswerRecord, SqliteQueue, default_queue_url, open_queue
from tests.conftest import run_cli
from tests.servers import cascade_serve, free_port

pytestmark = [pytest.mark.integration, pytest.mark.own_cluster]

SNIPPETS = load_movie_snippets()
TEXTS = SNIPPETS.texts[200:205]
LABELS = [SNIPPETS.label_names[int(label)] for label in SNIPPETS.labels[200:205]]


def feedback_records(url: str, since: float, timeout_s: float = 60.0) -> list[AnswerRecord]:
    """This test's feedback records in the queue at ``url`` once the gateway's writer has flushed them all."""
    deadline = time.monotonic() + timeout_s
    while True:
        queue = open_queue(url)
        try:
            found = [r for r in queue.export() if r.reason == "feedback" and r.text in TEXTS and r.time >= since]
        finally:
            queue.close()
        if len(found) >= len(TEXTS) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_the_gateway_writes_to_the_queue_cascade_queue_url_names(tiny_home_copy: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    env_queue = tmp_path / "queue-from-env.db"
    url = f"sqlite:///{env_queue}"
    default_queue = Path(default_queue_url(tiny_home_copy).removeprefix("sqlite:///"))
    assert default_queue != env_queue and not env_queue.exists() and not default_queue.exists()

    since = time.time()
    with cascade_serve("--metrics-port", str(free_port()), port=free_port(), home=tiny_home_copy,
                       log=tmp_path / "serve.log", env={"CASCADE_QUEUE_URL": url}) as served:
        answer = httpx.post(f"{served.url}/v1/feedback", json={"texts": TEXTS, "labels": LABELS}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["queued"] == len(TEXTS)
        records = feedback_records(url, since)

    assert sorted(r.text for r in records) == sorted(TEXTS), f"{len(records)} of {len(TEXTS)} records in {url}"
    assert all(r.teacher_probs is not None for r in records)  # the gateway asked the teacher for each
    if default_queue.exists():  # the gateway may have opened it for nothing else; it must hold none of ours
        queue = SqliteQueue(default_queue)
        try:
            assert not [r for r in queue.export() if r.text in TEXTS and r.time >= since]
        finally:
            queue.close()

    # The CLI, under the same variable, reads exactly that queue.
    monkeypatch.setenv("CASCADE_QUEUE_URL", url)
    exported = [json.loads(line) for line in run_cli("queue", "export", home=tiny_home_copy).stdout.splitlines()]
    assert {record["text"] for record in exported if record["reason"] == "feedback"} >= set(TEXTS)
