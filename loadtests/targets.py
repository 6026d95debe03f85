"""`cascade bench --targets`: the serving path's objectives, measured in one run on this machine, with a verdict.

Each objective is measured against numbers taken in the same run: the student's own limit without HTTP
(``model_only``) first, while the gateway is idle, then closed-loop wrk on the student route, Locust, an
open-loop overload at twice the measured capacity, and the highest open-loop rate the cascade (auto) and the
teacher alone each hold within the same p99. Everything goes to 127.0.0.1, bounded in time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtests.bench import run_wrk
from loadtests.model_only import ModelOnlyResult, StudentSpec, run_model_only
from loadtests.report import best_open_rate, open_loop_ladder, run_open_loop

CLOSED_LOOP = (1, 16, 32, 64, 256)
LOCUST_USERS = (16, 64)
SHARE_OF_MODEL = 0.90  # the student route at 32 connections, of the model-only texts/s
P99_MS = 100.0
# Auto and teacher-only compared at one p99 the teacher alone can hold on this CPU (its own p99 is near 100 ms).
COMPARE_P99_MS = 500.0
C1_OVERHEAD_MS = 2.5  # p50 at one connection over the model-only batch-1 p50
REFUSAL_P99_MS = 50.0
OVERLOAD = 2.0


@dataclass
class Verdict:
    """One objective: what was measured, against what, and whether it holds."""

    objective: str
    measured: str
    target: str
    passed: bool


@dataclass
class TargetRun:
    verdicts: list[Verdict] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, objective: str, measured: str, target: str, passed: bool) -> None:
        self.verdicts.append(Verdict(objective, measured, target, passed))


def closed_loop(run: TargetRun, url: str, texts: list[str], seconds: int, api_key: str | None,
                model: ModelOnlyResult) -> float:
    """wrk on the student route at each connection count; returns the best req/s seen (the capacity)."""
    points = {}
    for connections in CLOSED_LOOP:
        rps, p50, p99, errors = run_wrk(url, texts, "student", connections, seconds, api_key)
        points[connections] = {"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors}
    run.raw["closed_loop"] = points
    failed = {c: p["errors"] for c, p in points.items() if p["errors"]}
    run.add("closed loop 1-256 connections: refused or failed", ", ".join(f"{c}: {n}" for c, n in failed.items())
            or "0 at every point", "0", not failed)
    at32, best = points[32], model.best.texts_per_s
    run.add("student route at 32 connections, of model-only texts/s",
            f"{at32['rps']:.0f} of {best:.0f} = {at32['rps'] / best:.0%}, p99 {at32['p99_ms']:.0f} ms",
            f">= {SHARE_OF_MODEL:.0%}, p99 <= {P99_MS:.0f} ms",
            at32["rps"] >= SHARE_OF_MODEL * best and at32["p99_ms"] <= P99_MS)
    if model.batch1_p50_ms is not None:
        over = points[1]["p50_ms"] - model.batch1_p50_ms
        one_thread = next((r.p50_ms for r in model.rows if (r.processes, r.threads) == (1, 1)), None)
        aside = "" if one_thread is None else (f"; over the model on one thread, as a replica runs it "
                                               f"({one_thread:.2f} ms): {points[1]['p50_ms'] - one_thread:+.2f} ms")
        run.add("p50 at one connection over model-only batch-1 p50",
                f"{points[1]['p50_ms']:.2f} - {model.batch1_p50_ms:.2f} = {over:+.2f} ms{aside}",
                f"<= {C1_OVERHEAD_MS} ms", over <= C1_OVERHEAD_MS)
    return max(p["rps"] for p in points.values())


def locust_runs(run: TargetRun, locust: Callable[[int], Any]) -> None:
    """`cascade loadtest` at each user count: every request answered (a 503 counts as a failure)."""
    summaries = {users: locust(users) for users in LOCUST_USERS}
    run.raw["locust"] = {users: s.model_dump() for users, s in summaries.items()}
    run.add("cascade loadtest (Locust) failures", ", ".join(f"{u} users: {s.failures} of {s.requests}"
                                                            for u, s in summaries.items()),
            "0", all(s.failures == 0 for s in summaries.values()))


def overload(run: TargetRun, url: str, texts: list[str], seconds: int, api_key: str | None, capacity: float,
             deadline_s: float) -> None:
    """Open-loop arrivals at twice the capacity: refusals fast, the accepted within the queue deadline."""
    result = run_open_loop(url, texts, "student", round(OVERLOAD * capacity), seconds, "cascade (student)", api_key)
    outcomes = result.outcomes
    run.raw["overload"] = asdict(result)
    refused, answered, failed = outcomes["refused"], outcomes["answered"], outcomes["failed"]
    refused_p99 = refused["p99"] if refused["count"] else 0.0
    run.add(f"open loop at {OVERLOAD:g}x capacity ({result.offered_rps:.0f} req/s)",
            f"{refused['count']} refused (p99 {refused_p99:.0f} ms), {answered['count']} answered "
            f"(p99 {answered['p99'] or 0:.0f} ms), {failed['count']} failed",
            f"refusal p99 <= {REFUSAL_P99_MS:.0f} ms, answered p99 <= {deadline_s * 1000:.0f} ms, 0 failed",
            refused_p99 <= REFUSAL_P99_MS and (answered["p99"] or 0) <= deadline_s * 1000 and failed["count"] == 0)


def auto_against_teacher(run: TargetRun, url: str, texts: list[str], seconds: int, api_key: str | None) -> None:
    """The highest open-loop rate each route holds within the same p99: what the cascade buys."""
    rates = {}
    for route in ("auto", "teacher"):
        ladder = open_loop_ladder(url, texts, route, route, seconds, COMPARE_P99_MS, api_key)
        rates[route] = best_open_rate(ladder, route, COMPARE_P99_MS)
        run.raw[f"ladder_{route}"] = [asdict(r) for r in ladder]
    ratio = f"{rates['auto'] / rates['teacher']:.1f}x" if rates["teacher"] else "no teacher-only rate held"
    run.add(f"auto against teacher-only, highest open-loop rate at p99 <= {COMPARE_P99_MS:.0f} ms",
            f"{rates['auto']:.0f} / {rates['teacher']:.0f} req/s = {ratio}", "printed", rates["auto"] > 0)


def check_targets(url: str, spec: StudentSpec, texts: list[str], seconds: int, api_key: str | None,
                  deadline_s: float, locust: Callable[[int], Any]) -> TargetRun:
    """Every objective, in an order where each step's load has ended before the next is measured."""
    run = TargetRun()
    model = run_model_only(spec, texts, seconds)
    run.raw["model_only"] = asdict(model)
    capacity = closed_loop(run, url, texts, seconds, api_key, model)
    locust_runs(run, locust)
    overload(run, url, texts, seconds, api_key, capacity, deadline_s)
    auto_against_teacher(run, url, texts, seconds, api_key)
    return run


def format_targets(run: TargetRun) -> str:
    rows = [f"| {v.objective} | {v.measured} | {v.target} | {'PASS' if v.passed else 'FAIL'} |"
            for v in run.verdicts]
    return "\n".join(["| objective | measured | target | |", "|---|---|---|---|", *rows])


def targets_json(run: TargetRun) -> str:
    return json.dumps({"verdicts": [asdict(v) for v in run.verdicts], "raw": run.raw}, indent=2, default=str)
