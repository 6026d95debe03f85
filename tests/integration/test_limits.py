"""Process limits for real: `cascade serve --config` with a process_limits section, HAProxy in front.

A header over `max_header_bytes` is refused by HAProxy (4xx) and the replica keeps serving; connections that go
silent before their request is complete are closed after `client_timeout_s`; normal traffic passes meanwhile.

Run under the shared Ray lock (it starts its own `cascade serve` and stops Ray):
`flock /tmp/cascade-ray.lock timeout 900 .venv/bin/python -m pytest -q tests/integration/test_limits.py -x -s`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from serving.settings import ProcessLimits
from tests.conftest import CASCADE
from tests.integration.conftest import TEST_BASE
from tests.servers import Served, cascade_serve, free_port, serve_config_with

pytestmark = [pytest.mark.integration, pytest.mark.own_cluster]

# Small enough to measure in a bounded test, and unlike Ray's defaults (1 h client timeout, 4096 connections), so
# passing tests show the values reached HAProxy.
LIMITS = ProcessLimits(client_timeout_s=2, max_header_bytes=4096, max_connections=256, request_timeout_s=30,
                       keep_alive_timeout_s=30)
TEXT = {"texts": ["a warm, funny and beautifully acted film"]}


def _config(port: int) -> dict:
    # One replica starts faster on 2 cores; the limits sit in front of it.
    config = serve_config_with(port, Gateway={"num_replicas": 1, "user_config": TEST_BASE})
    config["process_limits"] = LIMITS.model_dump()
    del config["http_options"]["request_timeout_s"], config["http_options"]["keep_alive_timeout_s"]  # one place
    return config


@pytest.fixture(scope="module")
def served(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("limits")
    port = free_port()
    with cascade_serve("--metrics-port", str(free_port()), port=port, home=tiny_home, log=folder / "serve.log",
                       config=_config(port)) as served:
        yield served


def test_a_bad_limit_stops_cascade_serve_before_ray(tiny_home: Path, tmp_path: Path) -> None:
    config = _config(free_port())
    config["process_limits"]["max_conections"] = 10
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([CASCADE, "serve", "--config", str(path)], capture_output=True, text=True, timeout=120,
                            env=os.environ | {"CASCADE_HOME": str(tiny_home)})
    assert result.returncode == 1
    assert "process_limits" in result.stderr and "max_conections" in result.stderr


def test_haproxy_runs_with_the_configured_limits(served: Served) -> None:
    """The config Ray wrote for the HAProxy serving our port holds our values, not Ray's defaults."""
    configs = [path for path in Path("/tmp/haproxy-serve").glob("*/haproxy.cfg")
               if f":{served.port}" in path.read_text()]
    assert configs, "no HAProxy config for this port under /tmp/haproxy-serve"
    lines = {" ".join(line.split()) for line in max(configs, key=lambda p: p.stat().st_mtime).read_text().splitlines()}
    for directive in (f"maxconn {LIMITS.max_connections}", f"tune.bufsize {LIMITS.max_header_bytes + 1024}",
                      f"timeout client {LIMITS.client_timeout_s}s", "timeout server 32s",
                      f"timeout http-keep-alive {LIMITS.keep_alive_timeout_s}s"):
        assert directive in lines, directive


def _classify(client: httpx.Client, header: int = 0) -> httpx.Response:
    return client.post("/v1/classify", json=TEXT, headers={"x-padding": "a" * header} if header else {})


def test_a_header_over_the_limit_is_refused_and_the_replica_keeps_serving(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        assert _classify(client, header=LIMITS.max_header_bytes // 2).status_code == 200
        statuses = []
        for _ in range(10):  # refused ones interleaved with normal ones: every normal one is answered
            statuses.append(_classify(client, header=LIMITS.max_header_bytes + 2048).status_code)
            assert _classify(client).status_code == 200
        assert set(statuses) <= {400, 431} and len(statuses) == 10, statuses
        # The largest header value that still passes: a little under the limit (HAProxy's own encoding).
        low, high = LIMITS.max_header_bytes // 2, LIMITS.max_header_bytes + 2048
        while high - low > 16:
            middle = (low + high) // 2
            low, high = (middle, high) if _classify(client, header=middle).status_code == 200 else (low, middle)
        print(f"\nmax_header_bytes={LIMITS.max_header_bytes}: largest header value accepted ~{low} bytes")
        assert LIMITS.max_header_bytes - 1024 <= low <= LIMITS.max_header_bytes
        assert _classify(client).status_code == 200


def _seconds_until_closed(sock: socket.socket, limit_s: float) -> tuple[float, bytes]:
    """Read until the server closes the connection; returns (seconds, what it sent)."""
    start = time.monotonic()
    received = b""
    sock.settimeout(0.2)
    while time.monotonic() - start < limit_s:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    return time.monotonic() - start, received


def test_silent_connections_are_closed_after_the_client_timeout_while_traffic_passes(served: Served) -> None:
    host, port = "127.0.0.1", served.port
    head = f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    partial = {
        "nothing sent": b"",
        "half the headers": head.encode(),
        "half the body": (head + "Content-Length: 200\r\n\r\n" + '{"texts": ["a warm').encode(),
    }
    per_kind = 20
    answered: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            while not stop.is_set():
                answered.append(_classify(client).status_code)
                time.sleep(0.05)

    sender = threading.Thread(target=traffic)
    sender.start()
    results: dict[str, list[tuple[float, bytes]]] = {kind: [] for kind in partial}
    try:
        sockets = []
        for kind, payload in partial.items():
            for _ in range(per_kind):
                sock = socket.create_connection((host, port), timeout=5)
                sock.sendall(payload)
                sockets.append((kind, sock))
        closers = []
        for kind, sock in sockets:
            def measure(kind: str = kind, sock: socket.socket = sock) -> None:
                results[kind].append(_seconds_until_closed(sock, limit_s=LIMITS.keep_alive_timeout_s + 10))
            closers.append(threading.Thread(target=measure))
            closers[-1].start()
        for closer in closers:
            closer.join()
        for _, sock in sockets:
            sock.close()
    finally:
        stop.set()
        sender.join()
    for kind, measured in results.items():
        seconds = sorted(s for s, _ in measured)
        print(f"\n{kind}: {len(seconds)} connections closed after {seconds[0]:.2f}-{seconds[-1]:.2f} s "
              f"(client_timeout_s={LIMITS.client_timeout_s}); first answer {measured[0][1][:40]!r}")
        # Not before the timeout; long before the keep-alive timeout (30 s) or Ray's default (1 h).
        assert seconds[0] >= LIMITS.client_timeout_s - 0.5, kind
        assert seconds[-1] < LIMITS.client_timeout_s + 8, kind
        assert all(not sent or sent.startswith((b"HTTP/1.1 408", b"HTTP/1.1 400")) for _, sent in measured), kind
    print(f"normal requests meanwhile: {len(answered)}, statuses {sorted(set(answered))}")
    assert answered and set(answered) == {200}
