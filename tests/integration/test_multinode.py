"""Two Ray nodes on this machine: the Teacher pinned to the second by a custom resource, that node killed
under steady load (degraded answers, zero failures) and brought back (the teacher answers again within 60 s).

Run under the shared Ray lock (it stops every Ray on the machine at the end):
`flock /tmp/cascade-ray.lock timeout 900 .venv/bin/python -m pytest -q -s tests/integration/test_multinode.py`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import CASCADE
from tests.integration.conftest import TEST_BASE
from tests.servers import cascade_serve, free_port, serve_config_with, stop_ray

pytestmark = [pytest.mark.integration, pytest.mark.own_cluster]

RAY = str(Path(CASCADE).with_name("ray"))
RATE = 20.0  # requests per second, open loop
TEXT = "a warm, funny and beautifully acted film"


def ray_start(*args: str, env: dict[str, str]) -> None:
    result = subprocess.run([RAY, "start", "--disable-usage-stats", "--node-ip-address", "127.0.0.1", *args],
                            capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr


def node_ports(workers: tuple[int, int]) -> list[str]:
    """Explicit ports for one more node on this machine (the defaults would collide with the head's)."""
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
            "--min-worker-port", str(workers[0]), "--max-worker-port", str(workers[1])]


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    sockets: Path
    starts: int = 0

    def start_teacher_node(self) -> int:
        """A second Ray node holding the `teacher` resource; returns its node manager port."""
        self.starts += 1
        ports = node_ports((21000 + 500 * (self.starts % 2), 21499 + 500 * (self.starts % 2)))
        ray_start("--address", self.address, "--num-cpus", "1", "--resources", json.dumps({"teacher": 1}),
                  "--temp-dir", str(self.sockets / f"n{self.starts}"), *ports, env=self.env)
        return int(ports[1])

    def kill_node(self, node_manager_port: int) -> None:
        """kill -9 of that node's raylet: the node, and the Teacher replica on it, are gone at once."""
        raylets = [p for p in psutil.process_iter(["cmdline"])
                   if any(f"--node_manager_port={node_manager_port}" == arg for arg in (p.info["cmdline"] or []))]
        assert len(raylets) == 1, f"raylet on port {node_manager_port}: {raylets}"
        raylets[0].send_signal(signal.SIGKILL)


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    stop_ray()
    # Ray 2.60's head turns token authentication on when ~/.ray/auth_token exists, but `ray start --address`
    # sends a token only when RAY_AUTH_MODE says so: the second node was refused (InvalidAuthToken). Every
    # process of this cluster gets the mode and its own token, whatever ~/.ray holds.
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "token",
                        "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cmn-", dir="/tmp") as sockets:  # own temp dir per node, short
        try:
            ray_start("--head", "--port", str(port), "--num-cpus", "2", "--resources", json.dumps({"gateway": 100}),
                      "--include-dashboard", "true",
                      "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
                      *node_ports((20000, 20999)), env=env)
            yield Cluster(f"127.0.0.1:{port}", env, Path(sockets))
        finally:
            stop_ray()


@pytest.fixture()
def gateway_url(cluster: Cluster, tiny_home: Path, tmp_path: Path) -> Iterator[tuple[str, int]]:
    teacher_port = cluster.start_teacher_node()
    config = serve_config_with(
        Teacher={"ray_actor_options": {"resources": {"teacher": 1}}},
        # The Gateway stays on the head: on the teacher's node (it has a free CPU), losing the node would also lose
        # a Gateway replica and its requests in flight (503s), a different fault from the one tested here.
        Gateway={"ray_actor_options": {"resources": {"gateway": 1}},
                 "user_config": {"routing": {"threshold": 1.0},  # every text goes to the teacher
                                 "teacher": {"timeout_s": 2.0, "max_share": 1.0},
                                 # The fault under test is the teacher's node; a loaded 2-core machine must not
                                 # shed requests meanwhile.
                                 "limits": TEST_BASE["limits"]}})
    config["proxy_location"] = "HeadOnly"  # both nodes share 127.0.0.1: one HTTP proxy
    with cascade_serve("--no-fast", "--address", cluster.address, port=free_port(), home=tiny_home,
                       log=tmp_path / "serve.log", config=config, env=cluster.env, timeout_s=400,
                       own_ray=False) as served:  # the cluster fixture stops Ray
        yield served.url, teacher_port


@dataclass
class Answer:
    sent: float
    status: int
    served_by: str | None = None
    reason: str | None = None


class OpenLoop:
    """Steady load: one request every 1/RATE s whatever the answers do (a slow answer never slows the rate)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[Answer] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def one(self, http: httpx.Client, sent: float) -> None:
        try:
            response = http.post("/v1/classify", json={"texts": [TEXT]})
            if response.status_code == 200:
                result = response.json()["results"][0]
                answer = Answer(sent, 200, result["served_by"], result["reason"])
            else:
                answer = Answer(sent, response.status_code, reason=response.text[:200])
        except httpx.HTTPError as exc:
            answer = Answer(sent, 0, reason=type(exc).__name__)
        with self.lock:
            self.answers.append(answer)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, limits=httpx.Limits(max_connections=64)) as http, \
                ThreadPoolExecutor(max_workers=64) as pool:
            start = time.monotonic()
            sent = 0
            while not self.stop.is_set():
                pool.submit(self.one, http, time.monotonic())
                sent += 1
                time.sleep(max(0.0, start + sent / RATE - time.monotonic()))

    def teacher_answered_after(self, moment: float) -> float | None:
        with self.lock:
            times = [a.sent for a in self.answers if a.sent > moment and a.served_by == "teacher"]
        return min(times) if times else None


def test_teacher_node_lost_and_back_under_load(cluster: Cluster, gateway_url: tuple[str, int]) -> None:
    url, teacher_port = gateway_url
    load = OpenLoop(url)
    load.thread.start()
    try:
        time.sleep(10)
        start = time.monotonic() - 10
        assert load.teacher_answered_after(start) is not None, "the teacher on the second node never answered"
        killed = time.monotonic()
        cluster.kill_node(teacher_port)
        time.sleep(15)
        back = time.monotonic()
        cluster.start_teacher_node()
        recovered = None
        while recovered is None and time.monotonic() - back < 90:
            time.sleep(1)
            recovered = load.teacher_answered_after(back)
        time.sleep(3)
    finally:
        load.stop.set()
        load.thread.join(timeout=60)
    time.sleep(2)  # answers in flight
    answers = sorted(load.answers, key=lambda a: a.sent)
    failed = [a for a in answers if a.status != 200]
    gone = [a for a in answers if killed <= a.sent < back]
    degraded = [a for a in gone if a.served_by != "teacher"]
    reasons = sorted({a.reason for a in degraded if a.reason})
    recovery = None if recovered is None else recovered - back
    print(f"\n{len(answers)} requests at {RATE:.0f}/s; {len(failed)} failed; node gone {back - killed:.0f} s: "
          f"{len(degraded)} of {len(gone)} answers degraded {reasons}; teacher answered again "
          f"{'never' if recovery is None else f'{recovery:.1f} s'} after the node was back")
    assert not failed, [(a.status, a.reason) for a in failed[:5]]
    assert degraded and reasons and all(a.served_by == "student" for a in degraded)
    assert recovery is not None and recovery <= 60
