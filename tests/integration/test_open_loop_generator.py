"""The fault suite's open-loop generator against a local HTTP server: its rate and every answer recorded."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import pytest

from loadtests.faults import OpenLoop
from tests.unit.test_fault_measures import _Handler


@pytest.mark.integration  # a local HTTP server on a port, timed
def test_open_loop_sends_at_its_rate_and_records_every_answer() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        with OpenLoop(url, rate=50, seconds=1.0, body=lambda i: {"i": i}) as load:
            load.wait()
    finally:
        server.shutdown()
    assert len(load.outcomes) == 50  # due times 0, 0.02, ... 0.98 s
    assert all(o.status == 200 and not o.failed for o in load.outcomes)
    sent = sorted(o.sent_s for o in load.outcomes)
    assert sent[-1] >= 0.9  # spread over the second, not sent in one burst
