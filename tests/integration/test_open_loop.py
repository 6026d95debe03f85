"""The benchmark report's open-loop generator (npm loadtest) against the running gateway on 127.0.0.1."""

from __future__ import annotations

import os

import pytest

from distill.data import load_movie_snippets, stratified_split
from loadtests.report import best_open_rate, run_open_loop
from tests.integration.conftest import API_KEY, Gateway, apply_config

pytestmark = pytest.mark.integration


def test_open_loop_sends_at_the_offered_rate_and_reports_latency(gateway: Gateway) -> None:
    apply_config(gateway)
    texts = stratified_split(load_movie_snippets()).test.texts[:50]
    result = run_open_loop(gateway.url, texts, "student", 20, 4, "student only", API_KEY)
    assert result.errors == 0
    assert 18 <= result.achieved_rps <= 22  # the arrival rate is the generator's, not the server's
    assert 0 < result.p50_ms <= result.p99_ms
    assert result.texts >= 70 and result.teacher_texts == 0 and result.degraded == 0  # answers were read
    # The CPU table names the real processes: the Gateway replicas did the work, the idle teacher little of it.
    assert result.cpu["gateway"] > 0.05 and result.cpu["gateway"] > 5 * result.cpu["teacher"]
    assert result.cpu["load generator"] > 0 and 0 < result.cpu["busy_cores"] <= os.cpu_count()
    assert best_open_rate([result], "student only", p99_ms=result.p99_ms) == 20
    assert best_open_rate([result], "student only", p99_ms=result.p99_ms - 1) == 0


def test_a_wrong_key_counts_as_errors(gateway: Gateway) -> None:
    texts = stratified_split(load_movie_snippets()).test.texts[:10]
    result = run_open_loop(gateway.url, texts, "student", 10, 2, "student only", "not-the-key")
    assert result.errors > 0 and not result.holds(p99_ms=10_000)


def test_degraded_answers_are_counted_and_a_rate_held_by_them_does_not_count(gateway: Gateway) -> None:
    apply_config(gateway, teacher={"timeout_s": 0.0005})  # every teacher call times out: the student answers
    try:
        texts = stratified_split(load_movie_snippets()).test.texts[:20]
        result = run_open_loop(gateway.url, texts, "teacher", 10, 2, "teacher only", API_KEY)
    finally:
        apply_config(gateway)
    assert result.errors == 0 and result.texts >= 15
    assert result.degraded == result.texts and result.teacher_texts == 0
    assert not result.holds(p99_ms=10_000)
