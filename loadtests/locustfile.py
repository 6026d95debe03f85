"""Locust traffic for Cascade: single texts and small batches, with a share of texts the teacher must see.

Run it the way Locust users do: ``locust -f loadtests/locustfile.py --host http://127.0.0.1:8000``.
Default traffic ships beside this file (``traffic/default.json``); ``--traffic FILE`` replaces it,
``--hard-share`` sets how often a text the live threshold sends to the teacher is picked, and
``--api-key`` (or ``CASCADE_API_KEY``) authenticates. A traffic file holds either ``{"texts": [...]}``,
split into easy and hard at the start by asking the gateway itself (``route: student`` and the live
threshold), or ``{"easy": [...], "hard": [...]}`` already split (what `cascade loadtest` writes).

Kept free of the project's model code: Locust's gevent patching must not meet torch.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import requests
from locust import FastHttpUser, between, events, task

DEFAULT_TRAFFIC = Path(__file__).with_name("traffic") / "default.json"
FIELDS = {"label", "probabilities", "confidence", "served_by", "degraded", "reason", "student_version",
          "teacher_version"}
TRAFFIC: dict[str, list[str]] = {"easy": [], "hard": []}


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--traffic", default=str(DEFAULT_TRAFFIC), help="Traffic JSON (texts, or easy and hard).")
    parser.add_argument("--hard-share", type=float, default=0.1, help="Share of picks that are hard texts.")
    parser.add_argument("--api-key", default=os.environ.get("CASCADE_API_KEY", ""), help="Bearer key, if set.")


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def split_by_gateway(host: str, texts: list[str], api_key: str) -> dict[str, list[str]]:
    """Easy and hard texts as the running gateway sees them: hard ones fall under its live threshold."""
    headers = _headers(api_key)
    threshold = requests.get(f"{host}/v1/status", headers=headers, timeout=30).json()["threshold"]
    split: dict[str, list[str]] = {"easy": [], "hard": []}
    for start in range(0, len(texts), 32):
        chunk = texts[start : start + 32]
        answer = requests.post(f"{host}/v1/classify", json={"texts": chunk, "route": "student"}, headers=headers,
                               timeout=60)
        answer.raise_for_status()
        for text, result in zip(chunk, answer.json()["results"], strict=True):
            split["hard" if result["confidence"] < threshold else "easy"].append(text)
    return split


@events.test_start.add_listener
def _load_traffic(environment, **_kwargs) -> None:
    options = environment.parsed_options
    traffic = json.loads(Path(options.traffic).read_text())
    if "texts" in traffic:
        traffic = split_by_gateway(environment.host, traffic["texts"], options.api_key)
    TRAFFIC["easy"], TRAFFIC["hard"] = list(traffic.get("easy", [])), list(traffic.get("hard", []))
    if not TRAFFIC["easy"] and not TRAFFIC["hard"]:
        raise SystemExit(f"{options.traffic}: no texts")


class CascadeUser(FastHttpUser):
    """One client of the gateway; each task is one request, named by kind so the tables split them."""

    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        self.headers = _headers(self.environment.parsed_options.api_key)
        self.hard_share = self.environment.parsed_options.hard_share

    def _pick(self) -> tuple[str, bool]:
        hard = bool(TRAFFIC["hard"]) and (not TRAFFIC["easy"] or random.random() < self.hard_share)
        return random.choice(TRAFFIC["hard"] if hard else TRAFFIC["easy"]), hard

    def _classify(self, name: str, picks: list[tuple[str, bool]]) -> None:
        body = {"texts": [text for text, _ in picks], "route": "auto"}
        with self.client.post("/v1/classify", json=body, headers=self.headers, name=name,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            results = response.json().get("results", [])
            if len(results) != len(picks):
                response.failure(f"{len(results)} results for {len(picks)} texts")
                return
            for result, (_, hard) in zip(results, picks, strict=True):
                if set(result) != FIELDS or result["served_by"] not in ("student", "teacher"):
                    response.failure(f"unexpected answer: {result}")
                    return
                if hard and result["served_by"] != "teacher" and not result["degraded"]:
                    response.failure("a hard text was answered by the student without being marked degraded")
                    return
            response.success()

    @task(4)
    def single_text(self) -> None:
        pick = self._pick()
        self._classify("auto: 1 text (hard)" if pick[1] else "auto: 1 text", [pick])

    @task(1)
    def small_batch(self) -> None:
        self._classify("auto: batch of 2-8", [self._pick() for _ in range(random.randint(2, 8))])
