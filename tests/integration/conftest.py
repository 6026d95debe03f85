"""A real gateway: `cascade serve` on the tiny bundle, started once for the integration tests."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import CASCADE
from tests.servers import cascade_serve, free_port, merged, serve_config_with

API_KEY = "test-key-0123456789"
PORT = 8123
# Settings every test starts from: a generous teacher timeout and budget, so only the tests that
# mean to degrade the teacher see degraded answers on a loaded 2-core CI machine.
TEST_BASE = {"routing": {"threshold": None}, "teacher": {"timeout_s": 20.0, "max_concurrency": 8, "max_share": 1.0},
             "limits": {"admission_headroom": 16, "queue_deadline_s": 30.0}}


@dataclass
class Gateway:
    url: str
    home: Path
    log: Path
    metrics_port: int

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30, **kwargs)


def run_gateway(tiny_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """`cascade serve` on the tiny bundle until the session ends (the ``gateway`` fixture in tests/conftest.py,
    shared by the integration and fault suites: two gateways in one run would stop each other's Ray)."""
    log = tmp_path_factory.mktemp("gateway") / "serve.log"
    metrics_port = free_port()
    with cascade_serve("--metrics-port", str(metrics_port), port=PORT, home=tiny_home, log=log,
                       env={"CASCADE_API_KEY": API_KEY}) as served:
        yield Gateway(served.url, tiny_home, log, metrics_port)


def apply_config(gateway: Gateway, **user_config: dict) -> None:
    """`serve deploy` the default Serve config with Gateway user_config overrides (over ``TEST_BASE``, section by
    section); wait until every replica runs it.

    This is how an operator changes a running gateway: no restart, the replica's ``reconfigure`` runs.
    """
    config = serve_config_with(PORT, Gateway={"user_config": merged(TEST_BASE, user_config)})
    serve_deploy(gateway, config, "serve-config.yaml")
    gateway_deployment = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Gateway")
    wanted = gateway_deployment["user_config"]
    replicas = gateway_deployment["num_replicas"]
    applied: dict[str, bool] = {}  # per replica: does it run the new config?
    deadline = time.monotonic() + 120
    with gateway.client() as client:
        while time.monotonic() < deadline:
            applied = {replica: all(status["config"][section] == wanted[section]
                                    for section in wanted if section != "model")
                       for replica, status in replica_statuses(client, replicas).items()}
            if all(applied.values()):
                return
            time.sleep(0.2)
    raise AssertionError(f"configuration was not applied on {replicas} replicas within 120 s: {applied}")


def serve_deploy(gateway: Gateway, config: dict, name: str) -> None:
    """`serve deploy` ``config`` (written beside the gateway's log as ``name``) to the shared gateway's cluster;
    returns once Serve took it, not once the replicas run it (`apply_config` waits for that)."""
    path = gateway.log.with_name(name)
    path.write_text(yaml.safe_dump(config))
    # The local cluster has Ray's token authentication on; the CLI reads the token from ~/.ray.
    env = os.environ | {"CASCADE_HOME": str(gateway.home), "RAY_AUTH_MODE": "token"}
    deployed = subprocess.run(
        [str(Path(CASCADE).with_name("serve")), "deploy", "-a", "http://127.0.0.1:8265", str(path)],
        capture_output=True, text=True, env=env, timeout=120)
    assert deployed.returncode == 0, f"serve deploy failed:\n{deployed.stdout}\n{deployed.stderr}"


def replica_statuses(client: httpx.Client, replicas: int | None = None) -> dict[str, dict]:
    """``/v1/status`` of every Gateway replica (each keeps its own counters), asked until all answered."""
    from serving.app import DEPLOYMENT_OPTIONS

    replicas = replicas or DEPLOYMENT_OPTIONS["Gateway"]["num_replicas"]
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 30
    while len(seen) < replicas:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(seen)} of {replicas} replicas answered /v1/status")
        status = client.get("/v1/status").raise_for_status().json()
        seen[status["replica"]] = status
    return seen


def queue_total(client: httpx.Client, field: str) -> int:
    """A queue counter summed over the Gateway replicas."""
    return sum(status["queue"][field] for status in replica_statuses(client).values())
