"""Locust traffic for Cascade: real snippets, single texts and small batches, a share of hard texts.

Run through `cascade loadtest` (it prepares the traffic file and reads the results), or directly:
``CASCADE_TRAFFIC=traffic.json locust -f loadtests/locustfile.py --host http://127.0.0.1:8000``.
The traffic file holds ``{"easy": [...], "hard": [...], "hard_share": 0.1, "api_key": null}``:
hard texts are ones the live threshold sends to the teacher, so their answers must say so.

Kept free of the project's model code: Locust's gevent patching must not meet torch.
"""

from __future__ import annotations

import json
import os
import random

from locust import FastHttpUser, between, task

with open(os.environ["CASCADE_TRAFFIC"]) as handle:
    TRAFFIC = json.load(handle)
FIELDS = {"label", "probabilities", "confidence", "served_by", "degraded", "reason", "student_version",
          "teacher_version"}


class CascadeUser(FastHttpUser):
    """One client of the gateway; each task is one request, named by kind so the tables split them."""

    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        key = TRAFFIC.get("api_key")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def _pick(self) -> tuple[str, bool]:
        hard = bool(TRAFFIC["hard"]) and random.random() < TRAFFIC["hard_share"]
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
