"""The verdicts of `cascade bench --targets` (loadtests/targets.py), on made-up measurements: no server, no load."""

from __future__ import annotations

import pytest

from loadtests import targets
from loadtests.model_only import ModelOnlyResult, Row
from loadtests.report import OpenLoopResult


def model(texts_per_s: float = 500.0, batch1_p50_ms: float = 2.0) -> ModelOnlyResult:
    best = Row(2, 1, 1000, 2.0, texts_per_s, 3.0, 5.0)
    return ModelOnlyResult([best], best, batch1_p50_ms, 100)


def wrk_answers(points: dict[int, tuple[float, float, float, int]]):
    return lambda url, texts, route, connections, seconds, api_key: points[connections]


HEALTHY = {1: (200.0, 4.0, 6.0, 0), 16: (400.0, 40.0, 60.0, 0), 32: (460.0, 60.0, 90.0, 0),
           64: (470.0, 120.0, 180.0, 0), 256: (470.0, 500.0, 700.0, 0)}


def test_a_healthy_closed_loop_passes_and_the_capacity_is_its_best_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(targets, "run_wrk", wrk_answers(HEALTHY))
    run = targets.TargetRun()
    assert targets.closed_loop(run, "u", ["t"], 1, None, model()) == 470.0
    assert [v.passed for v in run.verdicts] == [True, True, True]
    assert "92%" in run.verdicts[1].measured


@pytest.mark.parametrize(("change", "failing"), [
    ({64: (470.0, 120.0, 180.0, 12)}, 0),  # refusals at 64 connections
    ({32: (400.0, 60.0, 90.0, 0)}, 1),  # 80% of the model
    ({32: (460.0, 60.0, 130.0, 0)}, 1),  # p99 over 100 ms
    ({1: (200.0, 5.0, 6.0, 0)}, 2),  # 3 ms over the model's batch-1 p50
])
def test_each_missed_objective_fails_its_own_line(monkeypatch: pytest.MonkeyPatch, change: dict, failing: int) -> None:
    monkeypatch.setattr(targets, "run_wrk", wrk_answers(HEALTHY | change))
    run = targets.TargetRun()
    targets.closed_loop(run, "u", ["t"], 1, None, model())
    assert [not v.passed for v in run.verdicts] == [i == failing for i in range(3)]


def overload_result(refused_p99: float, answered_p99: float, failed: int) -> OpenLoopResult:
    outcomes = {"refused": {"count": 500, "p99": refused_p99}, "answered": {"count": 480, "p99": answered_p99},
                "failed": {"count": failed, "p99": None}}
    return OpenLoopResult("s", 940.0, 900.0, 5.0, 500.0, failed, outcomes=outcomes)


@pytest.mark.parametrize(("refused_p99", "answered_p99", "failed", "passed"), [
    (20.0, 1500.0, 0, True), (80.0, 1500.0, 0, False), (20.0, 2500.0, 0, False), (20.0, 1500.0, 3, False)])
def test_overload_needs_fast_refusals_timely_answers_and_no_failure(
        monkeypatch: pytest.MonkeyPatch, refused_p99: float, answered_p99: float, failed: int, passed: bool) -> None:
    offered: list[float] = []

    def fake_open_loop(url, texts, route, rate, seconds, system, api_key):
        offered.append(rate)
        return overload_result(refused_p99, answered_p99, failed)

    monkeypatch.setattr(targets, "run_open_loop", fake_open_loop)
    run = targets.TargetRun()
    targets.overload(run, "u", ["t"], 1, None, capacity=470.0, deadline_s=2.0)
    assert offered == [940] and run.verdicts[0].passed is passed
    assert "FAIL" in targets.format_targets(run) or passed
