"""The fault suite's measures (loadtests/faults.py): what counts as failed, refused and degraded, the p99 and
the time to recover, checked on hand-made outcomes; and the open-loop generator against a real local server."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler

from loadtests.faults import FaultRow, Outcome, percentile_ms, recovery_s, table


def ok(sent: float, latency: float = 0.01, degraded: str | None = None) -> Outcome:
    return Outcome(sent, latency, 200, json_body=True,
                   results=[{"served_by": "student", "degraded": degraded is not None, "reason": degraded}])


def test_refusal_needs_json_and_retry_after() -> None:
    assert Outcome(0, 0.001, 503, retry_after="1", json_body=True).refused
    assert Outcome(0, 0.001, 503, retry_after="1", json_body=True).failed is False
    assert Outcome(0, 0.001, 503, json_body=True).failed  # no Retry-After: a failure, not a refusal
    assert Outcome(0, 0.001, 503, retry_after="1", json_body=False).failed  # Ray's plain-text 503
    assert Outcome(0, 0.001, None, error="ConnectError").failed
    assert Outcome(0, 0.001, 502).failed


def test_percentile_is_nearest_rank() -> None:
    latencies = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentile_ms(latencies, 99) == 99
    assert percentile_ms(latencies, 50) == 50
    assert percentile_ms([0.2], 99) == 200
    assert percentile_ms([], 99) is None


def test_recovery_is_the_end_of_the_last_bad_request_after_the_fault() -> None:
    outcomes = [ok(0), ok(1), ok(2, degraded="teacher_error"), ok(3, 0.5, degraded="teacher_error"), ok(4), ok(5)]
    assert recovery_s(outcomes, 1.5, lambda o: bool(o.degraded_reasons)) == 3.5 - 1.5
    assert recovery_s(outcomes[:4], 1.5, lambda o: bool(o.degraded_reasons)) is None  # still bad at the end
    assert recovery_s([ok(2), ok(3)], 1.0, lambda o: bool(o.degraded_reasons)) == 0.0
    # a bad request that ended before the fault is not the fault's; one in flight when it struck is
    assert recovery_s([ok(0, degraded="x"), ok(2)], 1.0, lambda o: bool(o.degraded_reasons)) == 0.0
    assert recovery_s([ok(0, 1.2, degraded="x"), ok(2)], 1.0, lambda o: bool(o.degraded_reasons)) == 1.2 - 1.0


def test_row_counts_and_table(tmp_path) -> None:
    outcomes = [ok(0), ok(1, degraded="teacher_timeout"), ok(2, degraded="teacher_timeout"),
                Outcome(3, 0.002, 503, retry_after="1", json_body=True), Outcome(4, 1.0, None, error="ReadTimeout")]
    row = FaultRow.from_outcomes("demo", outcomes, 2.0)
    assert (row.sent, row.failed, row.refused, row.degraded) == (5, 1, 1, {"teacher_timeout": 2})
    assert row.p99_ms == 10  # answered requests only
    from loadtests.faults import append_row

    rows = tmp_path / "rows.jsonl"
    append_row(rows, row)
    append_row(rows, FaultRow.from_outcomes("demo", outcomes[:1], None))  # the last row of a fault wins
    text = table(rows)
    assert text.count("| demo |") == 1 and "not within the run" in text


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{"results": [{"served_by": "student", "degraded": false}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass
