"""`routing.target_agreement` on a real gateway: each replica moves its threshold from its own live answers."""

from __future__ import annotations

import time

import httpx
import pytest

from distill.data import load_amazon_snippets
from tests.integration.conftest import Gateway, apply_config, replica_statuses

pytestmark = pytest.mark.integration

TEXTS = load_amazon_snippets().texts[:240]
CONTROLLER = {"interval_s": 0.2, "min_records": 40, "max_step": 0.05, "min_threshold": 0.3, "max_threshold": 0.95}


def stream_until(client: httpx.Client, done, timeout_s: float = 60.0) -> dict[str, dict]:
    """Send traffic (every text shadowed) until ``done(statuses)`` holds on every replica's /v1/status."""
    deadline = time.monotonic() + timeout_s
    statuses: dict[str, dict] = {}
    while time.monotonic() < deadline:
        for start in range(0, len(TEXTS), 24):
            client.post("/v1/classify", json={"texts": TEXTS[start : start + 24]}).raise_for_status()
        statuses = replica_statuses(client)
        if all(done(status) for status in statuses.values()):
            return statuses
    raise AssertionError(f"not reached within {timeout_s} s: { {r: s['threshold'] for r, s in statuses.items()} }")


def test_the_gateway_raises_or_lowers_its_threshold_to_hold_the_target(gateway: Gateway) -> None:
    with gateway.client() as client:
        apply_config(gateway)
        bundle_threshold = replica_statuses(client)
        start = {replica: status["threshold"] for replica, status in bundle_threshold.items()}
        # A target no threshold below 0.95 can hold at its lower bound on a few hundred answers: up to the bound.
        apply_config(gateway, routing={"target_agreement": 0.999, "controller": CONTROLLER}, shadow={"share": 1.0},
                     model={"poll_interval_s": 0.2})
        high = stream_until(client, lambda s: s["threshold"] == pytest.approx(CONTROLLER["max_threshold"]))
        assert all(status["threshold"] > start[replica] for replica, status in high.items() if replica in start)
        # A target any threshold holds: down to the cheapest, the lower bound.
        apply_config(gateway, routing={"target_agreement": 0.05, "controller": CONTROLLER}, shadow={"share": 1.0},
                     model={"poll_interval_s": 0.2})
        low = stream_until(client, lambda s: s["threshold"] == pytest.approx(CONTROLLER["min_threshold"]))
        for status in low.values():  # what the replica's own evidence asked for, and how much of it there was
            step = status["threshold_controller"]
            assert step["records"] >= CONTROLLER["min_records"] and step["wanted"] is not None
        deadline = time.monotonic() + 60  # Ray exports replica metrics on its own beat
        while "cascade_threshold_wanted" not in httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics",
                                                          timeout=10).text:
            assert time.monotonic() < deadline, "cascade_threshold_wanted not exported within 60 s"
            time.sleep(1)
        apply_config(gateway)
