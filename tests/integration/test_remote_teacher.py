"""The teacher on an inference server: the gateway defers to MLServer, survives its `kill -9`, and comes back.

A remote-teacher bundle is published into the running gateway's registry (the tiny bundle's student, a
manifest saying `teacher: remote`, no teacher/ folder) and the running gateway is pointed at it with
`serve deploy` (Gateway and Teacher pinned to that version, no restart). MLServer (its own venv) serves the
tiny teacher through mlserver-huggingface on 127.0.0.1. Under steady open-loop load MLServer is killed with
SIGKILL: deferred texts are answered degraded, with a reason, and no request fails; MLServer is started
again on the same port and the teacher is used again within 10 s of it being ready.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from bundle.registry import MANIFEST, TEACHER_DIR, Registry
from bundle.runtime import StudentRuntime
from bundle.teachers import RemoteTeacherSettings, TeacherSpec
from routing.confidence import ConfidenceMeasure, confidence, softmax
from tests.integration.conftest import API_KEY, PORT, TEST_BASE, Gateway, replica_statuses, serve_deploy
from tests.servers import MLServer, hf_model_settings, hf_teacher_folder, merged, serve_config_with

pytestmark = [pytest.mark.integration, pytest.mark.destructive(order=0)]

TEXTS = ["a moving, beautifully acted film", "dull and far too long", "not bad at all", "I walked out halfway",
         "the best thing I saw this year", "an utter mess of a plot", "fine, if forgettable", "charming and sharp",
         "I expected more", "a slow start but it pays off", "the actors seem bored", "funny from start to end"]
RATE = 20  # requests per second, one text each
RECOVERY_LIMIT_S = 10.0


@dataclass
class Answer:
    sent: float
    done: float
    status: int | None
    result: dict | None = None
    error: str | None = None


@dataclass
class Load:
    """Open-loop load: a request every 1/RATE s whatever the answers do; every answer kept with its times."""

    url: str
    answers: list[Answer] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=60,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            tasks, n, start = [], 0, time.monotonic()
            while not self.stop.is_set():
                tasks.append(asyncio.create_task(self._one(client, TEXTS[n % len(TEXTS)])))
                n += 1
                await asyncio.sleep(max(0.0, start + n / RATE - time.monotonic()))
            await asyncio.gather(*tasks)

    async def _one(self, client: httpx.AsyncClient, text: str) -> None:
        sent = time.monotonic()
        try:
            response = await client.post("/v1/classify", json={"texts": [text]})
            result = response.json()["results"][0] if response.status_code == 200 else None
            self.answers.append(Answer(sent, time.monotonic(), response.status_code, result))
        except Exception as exc:
            self.answers.append(Answer(sent, time.monotonic(), None, error=f"{type(exc).__name__}: {exc}"))


def deploy(gateway: Gateway, version: str | None, remote_url: str | None, threshold: float | None) -> None:
    """`serve deploy` the default Serve config with both deployments pinned to ``version`` (None: follow current)."""
    pinned = {"model": {"version": version}}
    config = serve_config_with(
        PORT, Gateway={"user_config": merged(TEST_BASE, pinned, {"routing": {"threshold": threshold}})},
        Teacher={"user_config": merged(pinned, {"runtime": {"remote_url": remote_url}})})
    serve_deploy(gateway, config, "serve-config-remote-teacher.yaml")


def wait_until(check, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.3)


def publish_remote_bundle(home: Path, server_url: str) -> tuple[str, float]:
    """The current bundle's student with a manifest saying `teacher: remote`; returns its version and a
    threshold (the median student confidence on TEXTS) so about half the texts defer."""
    registry = Registry(home)
    source = registry.load()
    staging = registry.root / f".staging-remote-{os.getpid()}"
    shutil.copytree(source.path, staging)
    shutil.rmtree(staging / TEACHER_DIR)
    (staging / MANIFEST).unlink()
    remote = RemoteTeacherSettings(
        url="http://127.0.0.1:9",  # as recorded at build time; the deployment's runtime.remote_url overrides it
        model="teacher", output="labels", input_name="array_inputs", timeout_s=5.0, retries=1,
        breaker_failures=3, breaker_reset_s=2.0,
        extra_inputs=[{"name": "top_k", "datatype": "INT32", "shape": [1], "data": [len(source.manifest.labels)]}])
    fields = source.manifest.model_dump(exclude={"version", "created", "files", "teacher", "teacher_version"})
    bundle = registry.publish(staging, fields | {"teacher": TeacherSpec(kind="remote", remote=remote),
                                                "teacher_version": f"mlserver:{server_url}/teacher"})
    student = StudentRuntime(bundle.student_path, bundle.tokenizer_dir, bundle.manifest.max_length)
    probs = softmax(student.logits(TEXTS), bundle.manifest.temperatures.student)
    confidences = confidence(probs, ConfidenceMeasure(bundle.manifest.confidence_measure))
    return bundle.version, float(np.median(confidences))


@pytest.fixture(scope="module")
def mlserver(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServer]:
    work = tmp_path_factory.mktemp("mlserver-remote")
    bundle_dir = Registry(gateway.home).load().path
    folder = hf_teacher_folder(bundle_dir, work / "hf-teacher")
    server = MLServer(work / "models", {"teacher": hf_model_settings("teacher", folder)})
    server.start()
    yield server
    server.stop()


def teacher_state(client: httpx.Client) -> tuple[int, dict]:
    response = client.get("/v2/health/ready")
    return response.status_code, response.json()


def test_gateway_defers_to_mlserver_and_survives_its_kill(gateway: Gateway, mlserver: MLServer) -> None:
    version, threshold = publish_remote_bundle(gateway.home, mlserver.url)
    deploy(gateway, version, mlserver.url, threshold)
    try:
        with gateway.client() as client:
            wait_until(lambda: teacher_state(client)[1].get("teacher", {}).get("kind") == "remote"
                       and all(s["student_version"] == version for s in replica_statuses(client).values()),
                       "every Gateway replica and the Teacher serve the remote-teacher bundle")
            code, ready = teacher_state(client)
            assert code == 200 and ready["teacher"]["ready"] and ready["teacher"]["breaker"] == "closed"
            assert ready["teacher"]["url"] == mlserver.url  # the deployment's override, not the recorded URL
            served = [client.post("/v1/classify", json={"texts": [t]}).json()["results"][0] for t in TEXTS]
            assert any(r["served_by"] == "teacher" for r in served) and not any(r["degraded"] for r in served)
            assert {r["label"] for r in served} <= set(Registry(gateway.home).load(version).manifest.labels)

        down_state, recovered_after = asyncio.run(kill_and_restart_under_load(gateway, mlserver))
    finally:
        deploy(gateway, None, None, None)
    answers, t_kill, t_back = recovered_after
    failed = [a for a in answers if a.status != 200]
    deferred = [a for a in answers if a.result and (a.result["served_by"] == "teacher" or a.result["degraded"])]
    degraded = [a for a in deferred if a.result["degraded"]]
    first_teacher_after = min((a.done for a in answers if a.sent >= t_back and a.result
                               and a.result["served_by"] == "teacher"), default=None)
    recovery_s = None if first_teacher_after is None else first_teacher_after - t_back
    print(f"\nremote teacher under {RATE} req/s: {len(answers)} requests, {len(failed)} failed, "
          f"{len(deferred)} deferred, {len(degraded)} degraded "
          f"(reasons {sorted({a.result['reason'] for a in degraded})}); MLServer down "
          f"{t_back - t_kill:.1f} s (restart until ready); teacher used again "
          f"{'never' if recovery_s is None else f'{recovery_s:.2f} s'} after MLServer was ready")
    assert not failed, f"{len(failed)} failed requests, e.g. {failed[:3]}"
    assert len(answers) >= RATE * 10
    # Answered while MLServer was down: sent after the kill and answered before the restart was seen ready. A
    # request sent just before that can wait in the gateway until MLServer answers again (not degraded, rightly).
    killed = [a for a in deferred if t_kill + 0.5 <= a.sent and a.done <= t_back - 0.5]
    assert killed and all(a.result["degraded"] and a.result["reason"] for a in killed), \
        "every deferred text while MLServer was down is answered by the student, degraded, with a reason"
    assert down_state["teacher"]["ready"] is False and down_state["teacher"]["breaker"] in ("open", "half_open")
    assert recovery_s is not None and recovery_s <= RECOVERY_LIMIT_S, f"teacher not used again: {recovery_s}"


async def kill_and_restart_under_load(gateway: Gateway, server: MLServer) -> tuple[dict, tuple[list[Answer], float,
                                                                                              float]]:
    """5 s with the teacher up, `kill -9`, 5 s down, restart on the same port, then load until the teacher
    answers again (at most RECOVERY_LIMIT_S + 5 s after it is ready)."""
    load = Load(gateway.url)
    runner = asyncio.create_task(load.run())
    await asyncio.sleep(5)
    t_kill = time.monotonic()
    server.kill()
    await asyncio.sleep(5)
    async with httpx.AsyncClient(base_url=gateway.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=30) as client:
        down_state = (await client.get("/v2/health/ready")).json()
    await asyncio.to_thread(server.start)  # blocks until MLServer says the model is ready
    t_back = time.monotonic()
    while time.monotonic() - t_back < RECOVERY_LIMIT_S + 5:
        if any(a.sent >= t_back and a.result and a.result["served_by"] == "teacher" for a in load.answers):
            await asyncio.sleep(1)  # a little more load after the recovery
            break
        await asyncio.sleep(0.2)
    load.stop.set()
    await runner
    return down_state, (load.answers, t_kill, t_back)
