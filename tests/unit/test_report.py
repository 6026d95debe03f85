"""The report's verdict at the edge: repeated runs, majority votes, and which points get repeated."""

from __future__ import annotations

from pathlib import Path

from loadtests.bench import LoadResult
from loadtests.report import (
    EDGE_RUNS,
    OpenLoopResult,
    best_open_rate,
    best_rate,
    confirm_edge,
    plots,
)

SYSTEM = "teacher only"


def open_run(rate: float, p99_ms: float) -> OpenLoopResult:
    return OpenLoopResult(SYSTEM, rate, rate, p99_ms / 3, p99_ms, errors=0, texts=100)


def closed_run(concurrency: int, rps: float, p99_ms: float) -> LoadResult:
    return LoadResult(SYSTEM, "teacher", concurrency, rps, p99_ms / 3, p99_ms, 0)


def test_a_rate_holds_when_most_of_its_runs_hold() -> None:
    lucky_once = [open_run(20, 50), open_run(30, 90), open_run(30, 130), open_run(30, 120)]
    assert best_open_rate(lucky_once, SYSTEM, p99_ms=100) == 20
    confirmed = [open_run(20, 50), open_run(30, 90), open_run(30, 130), open_run(30, 95)]
    assert best_open_rate(confirmed, SYSTEM, p99_ms=100) == 30
    assert best_open_rate([open_run(10, 101)], SYSTEM, p99_ms=100) == 0


def test_closed_loop_takes_the_median_throughput_of_a_point_most_of_whose_runs_held() -> None:
    runs = [closed_run(1, 30, 45), closed_run(2, 41, 80), closed_run(2, 37, 120), closed_run(2, 39, 90),
            closed_run(4, 48, 150)]
    assert best_rate(runs, SYSTEM, p99_ms=100) == 39
    runs[3] = closed_run(2, 39, 110)  # now two of the three runs at 2 missed
    assert best_rate(runs, SYSTEM, p99_ms=100) == 30


class ScriptedSystem:
    """A system whose p99 at each rate is given per run, so the order of runs decides the verdict."""

    def __init__(self, p99_by_rate: dict[float, list[float]]) -> None:
        self.p99_by_rate = p99_by_rate
        self.results: list[OpenLoopResult] = []

    def runs_at(self, rate: float) -> int:
        return sum(r.offered_rps == rate for r in self.results)

    def run(self, rate: float) -> None:
        self.results.append(open_run(rate, self.p99_by_rate[rate][self.runs_at(rate)]))

    def best(self) -> float | None:
        return best_open_rate(self.results, SYSTEM, p99_ms=100) or None


def test_a_best_rate_held_by_luck_gives_way_to_the_confirmed_one_below() -> None:
    system = ScriptedSystem({10: [40, 40, 40], 20: [60, 70, 65], 30: [90, 140, 150], 40: [200, 210, 220]})
    for rate in (10, 20, 30, 40):
        system.run(rate)
    assert system.best() == 30  # one run each: 30 looks held
    confirm_edge([10, 20, 30, 40], system.best, system.runs_at, system.run)
    assert system.best() == 20
    assert {rate: system.runs_at(rate) for rate in (10, 20, 30, 40)} == {10: 1, 20: EDGE_RUNS, 30: EDGE_RUNS, 40: 1}


def test_a_rate_above_that_holds_on_repeats_becomes_the_best_and_the_next_one_is_checked() -> None:
    system = ScriptedSystem({10: [40], 20: [60, 70, 65], 30: [130, 80, 85], 40: [150, 140, 160], 60: [300]})
    for rate in (10, 20, 30, 40):
        system.run(rate)
    assert system.best() == 20
    confirm_edge([10, 20, 30, 40, 60], system.best, system.runs_at, system.run)
    assert system.best() == 30
    assert {rate: system.runs_at(rate) for rate in (10, 20, 30, 40, 60)} == {
        10: 1, 20: EDGE_RUNS, 30: EDGE_RUNS, 40: EDGE_RUNS, 60: 0}


def test_with_nothing_held_the_lowest_rate_is_confirmed_and_nothing_above_it_runs() -> None:
    system = ScriptedSystem({10: [120, 90, 130], 20: [300]})
    system.run(10)
    confirm_edge([10, 20], system.best, system.runs_at, system.run)
    assert system.best() is None and system.runs_at(10) == EDGE_RUNS and system.runs_at(20) == 0


def test_the_report_draws_its_four_plots_from_runs(tmp_path: Path) -> None:
    """Each plot function draws from constructed runs alone; a broken one fails here, not after a long bench."""
    closed = [LoadResult("cascade (auto)", "auto", c, 100.0 * c, 5.0, 20.0, 0, {50.0: 5.0, 99.0: 20.0})
              for c in (1, 2, 4)]
    opened = [OpenLoopResult("cascade (auto)", rate, rate, 5.0, 10.0 + rate, errors=0, texts=100)
              for rate in (10, 20, 40)]
    curve = [{"teacher_share": share, "accuracy": 0.8 + share / 10} for share in (0.0, 0.1, 0.2)]
    quality = {"cascade (auto)": {"teacher_share": 0.12, "accuracy": 0.81}}
    plots(closed, opened, quality, curve, curve[1], tmp_path, 2, 100.0)
    names = {"latency_cdf.png", "throughput.png", "open_loop_p99.png", "accuracy_vs_share.png"}
    assert {path.name for path in tmp_path.iterdir()} == names
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in names)
