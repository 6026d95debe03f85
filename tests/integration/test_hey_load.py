"""``hey_load`` (loadtests/faults.py) against a real local server with the real `hey`: every request sent is
an outcome (answered ones from hey's CSV, unanswered ones counted from the known total), refusals are counted
by status, and the httpx probes see the refusal format hey cannot."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loadtests.faults import FaultRow, hey_load

pytestmark = pytest.mark.integration  # runs the real `hey` in subprocesses against a local HTTP server


class _Handler(BaseHTTPRequestHandler):
    """/refuse-half: every second request from hey refused (JSON 503 + Retry-After), the rest answered, and every
    other client (the httpx probes) refused, so the probes always see a refusal; /drop: the connection is closed
    without an answer."""

    calls = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/drop":
            self.close_connection = True
            self.connection.close()
            return
        with self.lock:
            type(self).calls += 1
            refuse = self.calls % 2 == 0 or not self.headers.get("User-Agent", "").startswith("hey")
        body = b'{"detail": "overloaded"}' if refuse else b'{"results": [{"served_by": "student", "degraded": false}]}'
        self.send_response(503 if refuse else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if refuse:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_every_request_is_an_outcome_and_probes_see_the_refusal_format(server: str) -> None:
    run = hey_load(f"{server}/refuse-half", rate=20, seconds=2, body={"texts": ["x"]},
                   headers={"Authorization": "Bearer k"}, timeout_s=5, probes=4)
    assert (run.workers, run.qps_per_worker, run.offered_rate) == (20, 1, 20)
    assert len(run.outcomes) == 40
    statuses = Counter(o.status for o in run.outcomes)
    assert set(statuses) == {200, 503} and statuses[200] >= 10 and statuses[503] >= 10, statuses
    row = FaultRow.from_outcomes("demo", run.outcomes, 0.0)
    assert (row.failed, row.refused) == (0, statuses[503])  # refusals counted by status: hey sees no headers
    sent = [o.sent_s for o in run.outcomes]
    assert min(sent) > 0.5 and max(sent) - min(sent) > 0.9  # each worker: 1/Q s to its first tick, 1/Q s apart
    assert len(run.probes) == 4 and all(o.body_seen for o in run.probes)
    refusals = [o for o in run.probes if o.status == 503]
    assert refusals and all(o.refused for o in refusals)


def test_unanswered_requests_are_counted(server: str) -> None:
    run = hey_load(f"{server}/drop", rate=8, seconds=1, body={}, timeout_s=2)
    assert len(run.outcomes) == 8
    assert all(o.status is None and o.failed and math.isnan(o.latency_s) for o in run.outcomes)
