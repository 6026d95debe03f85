"""`cascade serve` stops everything it started on SIGTERM and SIGINT: no HAProxy left listening.

Ray Serve 2.60 starts HAProxy as a plain child of the HAProxyManager actor (``-db``, same session). A signal
to the serve process group reaches Ray's own daemons too; when they die before Serve's controller has
stopped the proxy, the actor's worker exits and HAProxy is orphaned, still bound to 0.0.0.0 on the
serving port, the stats port (8404) and the metrics port (9101).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.servers import cascade_serve, free_port, stop_ray

pytestmark = [pytest.mark.integration, pytest.mark.own_cluster]

HAPROXY_STATS_PORT = 8404
HAPROXY_METRICS_PORT = 9101


def _listeners(ports: set[int]) -> list[tuple[int, int | None]]:
    """(port, pid) for every TCP socket listening on one of ``ports``."""
    return [(conn.laddr.port, conn.pid) for conn in psutil.net_connections(kind="tcp")
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports]


def _haproxy_processes() -> list[psutil.Process]:
    """Ray Serve's HAProxy processes: their config lies under Ray's HAProxy directory (others may run theirs)."""
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC

    ray_dir = str(Path(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC).parent) + "/"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and Path(cmdline[0]).name == "haproxy" and any(arg.startswith(ray_dir) for arg in cmdline):
            found.append(process)
    return found


# SIGTERM is what docker, Kubernetes and systemd send; SIGINT is a terminal's Ctrl-C. A SIGINT to the group leaves
# Ray's GCS and raylet alive, and a stop through Serve's graceful shutdown then waited out its 30 s drain of the
# Gateway replicas (over 120 s late in a full suite run); a signal now stops the local Ray outright, as SIGTERM did.
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_process_group_leaves_no_listener(tiny_home: Path, tmp_path: Path,
                                                        stop_signal: signal.Signals) -> None:
    stop_ray()
    assert not _haproxy_processes(), "an HAProxy from an earlier run is still alive; the check would be void"
    port = free_port()
    try:
        with cascade_serve("--metrics-port", str(free_port()), port=port, home=tiny_home,
                           log=tmp_path / "serve.log") as served:
            process, log = served.process, served.log
            ports = {port, HAPROXY_STATS_PORT, HAPROXY_METRICS_PORT}
            assert _haproxy_processes(), "the fast path should run HAProxy; nothing to check otherwise"
            assert {p for p, _ in _listeners(ports)} == ports, "HAProxy should listen on all three ports while serving"

            os.killpg(process.pid, stop_signal)  # as `docker stop`, systemd or a terminal's Ctrl-C do
            signalled = time.monotonic()
            process.wait(timeout=120)
            print(f"cascade serve stopped {time.monotonic() - signalled:.1f} s after {stop_signal.name}")
            deadline = time.monotonic() + 30  # the kernel may take a moment to release a dying process's sockets
            while (_listeners(ports) or _haproxy_processes()) and time.monotonic() < deadline:
                time.sleep(0.5)
            left = _listeners(ports)
            haproxies = [(p.pid, p.info["cmdline"]) for p in _haproxy_processes()]
            assert not left, f"still listening after {stop_signal.name}: {left}\n{log.read_text()[-3000:]}"
            assert not haproxies, f"HAProxy left running after {stop_signal.name}: {haproxies}"
            assert process.returncode == 0, f"cascade serve exited with {process.returncode}"
            # Not through Serve's graceful shutdown, whose drain of the Gateway replicas times out (30 s) on a stop.
            assert "Controller failed to shut down" not in log.read_text(), log.read_text()[-3000:]
    finally:  # cascade_serve stopped what was left of serve and Ray; never leave a listener for the next test
        for haproxy in _haproxy_processes():
            haproxy.kill()
