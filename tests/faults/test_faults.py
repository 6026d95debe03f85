"""Faults under steady open-loop load: what a client sees, counted, and how long until the gateway recovers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from loadtests.faults import FaultRow, OpenLoop, hey_load, percentile_ms, recovery_s
from tests.faults.conftest import HEADERS, long_fault, record, replica_pids
from tests.integration.conftest import apply_config

pytestmark = [pytest.mark.integration, pytest.mark.faults]

TEXTS = ["a gripping, beautifully acted film", "dull and far too long", "it was fine, i guess",
         "not bad at all, though not great either", "the worst thing i have seen this year",
         "an instant classic"]


def auto_body(i: int) -> dict:
    return {"texts": [TEXTS[i % len(TEXTS)]]}


def test_teacher_replica_killed(gateway) -> None:
    """kill -9 of the Teacher's worker: zero failed requests, the teacher's share answered degraded (counted
    by reason) until Serve has started a new Teacher replica, then served by the teacher again."""
    def body(i: int) -> dict:  # every 4th request asks for the teacher, so its absence and return are seen
        return {"texts": [TEXTS[i % len(TEXTS)]], "route": "teacher" if i % 4 == 0 else "auto"}

    from serving.settings import TeacherSettings

    # The production teacher timeout (the suite's base is generous), so a deferred text waits at most that long.
    apply_config(gateway, teacher={"timeout_s": TeacherSettings().timeout_s})
    (teacher,) = replica_pids("Teacher")
    with OpenLoop(f"{gateway.url}/v1/classify", rate=10, seconds=75, body=body, headers=HEADERS) as load:
        time.sleep(5)
        fault_at = load.now()
        os.kill(teacher, signal.SIGKILL)
        load.wait()
    outcomes = load.outcomes
    teacher_asks = [o for o in outcomes if o.index % 4 == 0]

    def not_by_teacher(o) -> bool:
        return o.status != 200 or any(r["served_by"] != "teacher" for r in o.results)

    recovered = recovery_s(teacher_asks, fault_at, not_by_teacher)
    row = FaultRow.from_outcomes("Teacher replica killed (kill -9), 10 req/s", outcomes, recovered,
                                 note="recovery: until forced-teacher requests are served by the new replica")
    record(row)
    assert row.failed == 0, Counter(o.status for o in outcomes if o.failed)
    assert row.degraded, "the dead teacher's share should have been answered degraded"
    assert recovered is not None, "the teacher never answered again within the run"
    assert replica_pids("Teacher") and replica_pids("Teacher") != [teacher]


@long_fault
@pytest.mark.destructive(order=5)
def test_gateway_replica_killed(gateway) -> None:
    """kill -9 of one of the two Gateway replicas at 40 req/s. HAProxy sends a request whose replica died before
    answering (connection closed, `empty-response`) to the other replica (`cascade serve` sets
    RAY_SERVE_HAPROXY_RETRY_ON), as it does a failed connection; the health check then marks the dead one down
    until Serve has started a new replica. Three runs: 0, 1 and 1 of 1,600 failed (each failure a client connection
    closed unanswered, cause not found); more than 1 in 1,000 fails."""
    victim = replica_pids("Gateway")[0]
    with OpenLoop(f"{gateway.url}/v1/classify", rate=40, seconds=40, body=auto_body, headers=HEADERS) as load:
        time.sleep(5)
        fault_at = load.now()
        os.kill(victim, signal.SIGKILL)
        load.wait()
    outcomes = load.outcomes
    recovered = recovery_s(outcomes, fault_at, lambda o: o.failed)
    seen = Counter(str(o.status or o.error) for o in outcomes if o.failed)
    row = FaultRow.from_outcomes("one Gateway replica killed (kill -9), 40 req/s", outcomes, recovered,
                                 note="failed answers: " + (", ".join(f"{k} x{v}" for k, v in seen.items()) or "none"))
    record(row)
    assert recovered is not None, "requests were still failing at the end of the run"
    assert row.failed <= row.sent / 1000, f"{row.failed} of {row.sent} failed: {row.note}"


# Overload requests: 32 texts each, student only. Heavy enough that three times the gateway's capacity is a rate
# the load generator, on the same 2 cores, can still send; the student only, so the capacity is the gateway's.
OVERLOAD_BODY = {"texts": [TEXTS[k % len(TEXTS)] for k in range(32)], "route": "student"}


def _capacity(url: str, seconds: float = 5.0, concurrency: int = 16) -> float:
    """Requests per second the gateway answers with ``concurrency`` requests always outstanding (closed loop)."""
    import asyncio

    async def run() -> int:
        done = 0
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(headers=HEADERS, timeout=10) as client:
            async def worker(k: int) -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    if (await client.post(url, json=OVERLOAD_BODY)).status_code == 200:
                        done += 1
            await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return done

    return asyncio.run(run()) / seconds


def test_overload_three_times_capacity(gateway) -> None:
    """Three times the sustainable rate: refusals are fast (p99 under 50 ms), JSON, with Retry-After; accepted
    requests keep a bounded p99; no request goes unanswered."""
    from serving.settings import LimitSettings

    apply_config(gateway, limits=LimitSettings().model_dump())  # the production admission limit and queue deadline
    url = f"{gateway.url}/v1/classify"
    # The larger of two measurements: one can fall on a stretch where something else holds the cores (in
    # `make faults`, the Teacher replica still reloading after the fault before this one).
    capacity = max(_capacity(url), _capacity(url))
    # The closed loop under-measures on a busy machine (its own client shares the cores with the gateway; on CI it
    # measured 11-15 req/s, and 3x that was refused about 3% of the time, so 20 probes often saw no refusal): where
    # under a tenth of the load was refused, the rate is doubled and the run repeated, at most twice.
    rate, earlier = 3 * capacity, []
    for attempt in range(3):
        # The load from hey, in its own compiled processes, so its clock is not the test interpreter's; hey sees
        # only status and timing, so 20 httpx probes during the same load check what a refusal carries.
        run = hey_load(url, rate=rate, seconds=15, body=OVERLOAD_BODY, headers=HEADERS, timeout_s=20, probes=20)
        outcomes = run.outcomes
        refusals = [o for o in outcomes if o.status in (429, 503)]
        probe_refusals = [o for o in run.probes if o.status in (429, 503)]
        assert not [o for o in outcomes if o.status is None], "requests went unanswered within 20 s"
        assert not [o for o in outcomes if o.failed], Counter(o.status for o in outcomes if o.failed)
        assert not [o for o in run.probes if o.failed], Counter(o.status for o in run.probes if o.failed)
        if attempt == 2 or (probe_refusals and len(refusals) >= 0.1 * len(outcomes)):
            break
        earlier.append(f"{rate:.0f} req/s: {len(refusals)} of {len(outcomes)} refused")
        rate *= 2
    refusal_ms = [o.latency_s for o in refusals]
    sent = [o.sent_s for o in outcomes if o.status is not None]
    achieved = len(outcomes) / max(1e-3, max(sent) - min(sent))

    def ms(q: float) -> str:
        value = percentile_ms(refusal_ms, q)
        return "-" if value is None else f"{value:.0f}"

    row = FaultRow.from_outcomes(f"overload: {rate / capacity:.0f}x capacity ({capacity:.0f} req/s closed loop) = "
                                 f"{rate:.0f} req/s, 32 texts each, student",
                                 outcomes, None if any(o.status is None for o in outcomes) else 0.0,
                                 note=f"hey offered {run.offered_rate} req/s ({run.workers} workers x "
                                      f"{run.qps_per_worker}/s, {run.processes} processes), sent at {achieved:.0f} "
                                      f"req/s; refusal p50 {ms(50)} ms, p99 {ms(99)} ms; refusal format checked on "
                                      f"{len(run.probes)} httpx probes ({len(probe_refusals)} refused)"
                                      + (f"; first at {', '.join(earlier)}" if earlier else ""))
    record(row)
    assert not [o for o in outcomes if o.status is None], "requests went unanswered within 20 s"
    assert refusals, "three times capacity was not refused at all"
    assert probe_refusals, "no probe was refused, so the refusal format went unchecked"
    assert all(o.refused for o in probe_refusals), "a refusal lacked its JSON body or Retry-After"
    assert not [o for o in run.probes if o.failed], Counter(o.status for o in run.probes if o.failed)
    assert row.failed == 0, Counter(o.status for o in outcomes if o.failed)
    # The refusal p99 (objective: under 50 ms) and the accepted p99 are printed in the table, not asserted: on a
    # shared 2-core machine the gateway competes with other work for the cores (the team's rule: tests never
    # assert wall-clock speed).


def _stalled_connection(port: int, kind: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if kind == "headers":  # never finishes its headers
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
    else:  # promises a body it never sends
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"texts\": [")
    return sock


def test_slow_and_half_open_clients(gateway) -> None:
    """300 connections that never finish their headers or body, held while normal traffic runs: normal traffic
    passes, and the stalled connections are closed by the client timeout (ProcessLimits.client_timeout_s)."""
    from serving.settings import ProcessLimits

    timeout_s = ProcessLimits().client_timeout_s
    port = int(gateway.url.rsplit(":", 1)[1])
    stalled = [_stalled_connection(port, "headers" if k % 2 else "body") for k in range(300)]
    opened = time.monotonic()
    try:
        with OpenLoop(f"{gateway.url}/v1/classify", rate=20, seconds=timeout_s + 5, body=auto_body,
                      headers=HEADERS) as load:
            closed_after: list[float] = []
            for sock in stalled:
                sock.settimeout(max(0.1, opened + timeout_s + 15 - time.monotonic()))
                try:
                    while sock.recv(4096):  # HAProxy may answer 408 first; closed when recv gives b""
                        pass
                    closed_after.append(time.monotonic() - opened)
                except (TimeoutError, OSError):
                    pass
            load.wait()
    finally:
        for sock in stalled:
            sock.close()
    outcomes = load.outcomes
    row = FaultRow.from_outcomes(f"{len(stalled)} stalled connections (headers or body never finished), 20 req/s",
                                 outcomes, max(closed_after, default=None),
                                 note=f"{len(closed_after)} of {len(stalled)} closed by the server; client timeout "
                                      f"{timeout_s} s; recovery = when the last one was closed")
    record(row)
    assert row.failed == 0, Counter(o.status for o in outcomes if o.failed)
    assert len(closed_after) == len(stalled), f"only {len(closed_after)} of {len(stalled)} stalled connections closed"
    assert max(closed_after) < timeout_s + 10
    assert percentile_ms([o.latency_s for o in outcomes], 99) is not None


def _publish_variant(registry, temperature_factor: float) -> str:
    """A second registered version: the current student at another temperature, so its probabilities differ."""
    bundle = registry.load()
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=registry.root))
    shutil.rmtree(staging)
    shutil.copytree(bundle.path, staging)
    (staging / "manifest.json").unlink()
    fields = bundle.manifest.model_dump(exclude={"version", "created", "files"})
    fields["temperatures"]["student"] *= temperature_factor
    return registry.publish(staging, fields | {"parent_version": bundle.version}).version


def _answers_of(gateway, version: str, deadline_s: float = 60) -> dict[str, dict[str, float]]:
    """Each text's student probabilities once every replica serves ``version`` (20 answers in a row)."""
    with gateway.client() as client:
        deadline, streak = time.monotonic() + deadline_s, 0
        while streak < 20:
            assert time.monotonic() < deadline, f"the gateway never settled on {version}"
            result = client.post("/v1/classify", json={"texts": TEXTS[:1], "route": "student"}).json()["results"][0]
            streak = streak + 1 if result["student_version"] == version else 0
        results = client.post("/v1/classify", json={"texts": TEXTS, "route": "student"}).json()["results"]
    assert {r["student_version"] for r in results} == {version}
    return {text: r["probabilities"] for text, r in zip(TEXTS, results, strict=True)}


@long_fault
@pytest.mark.destructive(order=6)
def test_promotion_and_rollback_under_load(gateway) -> None:
    """Promote, roll back and promote again under steady load: zero failed requests, and every answer's
    ``student_version`` is the student whose probabilities it carries (the two versions differ in temperature)."""
    from bundle.registry import Registry
    from tests.conftest import run_cli

    apply_config(gateway, model={"poll_interval_s": 0.5})
    registry = Registry(gateway.home)
    parent = registry.current_version()
    new = _publish_variant(registry, temperature_factor=2.0)
    reference = {parent: _answers_of(gateway, parent)}
    run_cli("promote", new, home=gateway.home)
    reference[new] = _answers_of(gateway, new)
    run_cli("rollback", home=gateway.home)
    _answers_of(gateway, parent)

    def body(i: int) -> dict:
        return {"texts": [TEXTS[i % len(TEXTS)]], "route": "student"}

    swaps: list[tuple[float, str]] = []
    with OpenLoop(f"{gateway.url}/v1/classify", rate=20, seconds=90, body=body, headers=HEADERS) as load:
        for action, version in (("promote", new), ("rollback", parent), ("promote", new)):
            time.sleep(5)
            swaps.append((load.now(), version))
            run_cli(*(["promote", version] if action == "promote" else ["rollback"]), home=gateway.home)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                recent = sorted(load.outcomes[-40:], key=lambda o: o.sent_s)[-20:]
                if len(recent) == 20 and all(r["student_version"] == version for o in recent for r in o.results):
                    break
                time.sleep(0.5)
        load.stop()
    outcomes = load.outcomes
    mismatched = []
    versions = Counter()
    for outcome in outcomes:
        for result in outcome.results:
            version = result["student_version"]
            versions[version] += 1
            text = TEXTS[outcome.index % len(TEXTS)]
            expected = reference.get(version, {}).get(text)
            if expected is None or any(abs(result["probabilities"][k] - v) > 1e-3 for k, v in expected.items()):
                mismatched.append((outcome.index, version))
    settle = [next((o.sent_s - at for o in sorted(outcomes, key=lambda o: o.sent_s)
                    if o.sent_s > at and o.results and o.results[0]["student_version"] == version), None)
              for at, version in swaps]
    row = FaultRow.from_outcomes("promote, rollback, promote under load, 20 req/s", outcomes,
                                 max((s for s in settle if s is not None), default=None),
                                 note=f"answers by version {dict(versions)}; probabilities inconsistent with the "
                                      f"version: {len(mismatched)}; recovery = slowest swap to its first answer")
    record(row)
    assert row.failed == 0, Counter(o.status for o in outcomes if o.failed)
    assert not mismatched, mismatched[:10]
    assert set(versions) == {parent, new}


def _redis(port: int, workdir: Path) -> subprocess.Popen:
    """redis-server on 127.0.0.1:port with an fsync-always append-only file in ``workdir``, so a restart keeps
    what it acknowledged (without it a restart would lose the queue, whatever the gateway did)."""
    process = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port",
                                str(port), "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                                "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)


def _queue_counters(gateway) -> dict[str, int]:
    from tests.integration.conftest import replica_statuses

    with gateway.client() as client:
        statuses = replica_statuses(client).values()
    return {field: sum(s["queue"][field] for s in statuses) for field in ("written", "dropped", "retried", "backlog")}


def _wait_drained(gateway, timeout_s: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        counters = _queue_counters(gateway)
        if counters["backlog"] == 0 or time.monotonic() > deadline:
            return counters
        time.sleep(0.5)


SHADOW_EVERYTHING = {"keep": "all", "flush_interval_s": 0.1}


@long_fault
def test_redis_stopped_30_s_and_restarted(gateway, tmp_path) -> None:
    """Redis down for 30 s under load: every record the writer acknowledged (counted written) is in Redis after
    the restart, the writer reconnects by itself, and what it could not hold is counted as dropped."""
    from records.queue import open_queue
    from tests.servers import free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis = _redis(port, tmp_path)
    try:
        apply_config(gateway, queue={"url": url, **SHADOW_EVERYTHING}, shadow={"share": 1.0, "max_concurrency": 8})
        before = _wait_drained(gateway)
        assert open_queue(url).stats().backlog == 0
        with OpenLoop(f"{gateway.url}/v1/classify", rate=10, seconds=60, body=auto_body, headers=HEADERS) as load:
            time.sleep(10)
            fault_at = load.now()
            redis.terminate()  # SIGTERM: Redis flushes its append-only file and exits
            redis.wait(timeout=30)
            time.sleep(30)
            redis = _redis(port, tmp_path)
            back_at = load.now()
            load.wait()
        after = _wait_drained(gateway)
        stored = open_queue(url).stats().backlog
    finally:
        if redis.poll() is None:
            redis.terminate()
            redis.wait(timeout=30)
    written = after["written"] - before["written"]
    dropped = after["dropped"] - before["dropped"]
    retried = after["retried"] - before["retried"]
    row = FaultRow.from_outcomes("Redis stopped 30 s, then restarted, 10 req/s (every answer shadowed)", load.outcomes,
                                 None if after["backlog"] else back_at - fault_at + 0.0,
                                 note=f"records acknowledged {written}, in Redis after restart {stored}, dropped "
                                      f"{dropped}, write retries {retried}; recovery = outage + drain")
    record(row)
    assert row.failed == 0, Counter(o.status for o in load.outcomes if o.failed)
    assert retried > 0, "the writer never noticed Redis was gone"
    assert after["backlog"] == 0, "the writer did not reconnect and drain its buffer"
    assert stored == written, f"{written} records acknowledged, {stored} in Redis: {written - stored} lost"


DISK_FULL = "database or disk is full"  # SQLite's own words (SQLITE_FULL)


@long_fault
def test_sqlite_on_a_full_disk(gateway, tmp_path) -> None:
    """The SQLite queue on a 1 MiB tmpfs that fills up: requests are still answered; the failed writes show in
    the queue metrics (retries, then drops once the buffer is full) and in the replica logs."""
    from serving.settings import LimitSettings

    mount = tmp_path / "full"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        apply_config(gateway, queue={"url": f"sqlite:///{mount}/queue.db", "buffer_size": 200, **SHADOW_EVERYTHING},
                     shadow={"share": 1.0, "max_concurrency": 8})
        before = _queue_counters(gateway)

        def long_body(i: int) -> dict:  # long texts (within limits.max_chars), so records fill the megabyte soon
            return {"texts": [((TEXTS[i % len(TEXTS)] + " ") * 60)[:LimitSettings().max_chars]]}

        with OpenLoop(f"{gateway.url}/v1/classify", rate=10, seconds=40, body=long_body, headers=HEADERS) as load:
            load.wait()
        after = _queue_counters(gateway)
    finally:
        apply_config(gateway)  # back to the default queue before the tmpfs goes
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    retried, dropped = after["retried"] - before["retried"], after["dropped"] - before["dropped"]
    logs = "".join(p.read_text(errors="replace") for p in Path("/tmp/ray/session_latest/logs/serve").glob(
        "replica_cascade_Gateway_*.log"))
    row = FaultRow.from_outcomes("SQLite queue on a full 1 MiB disk, 10 req/s (every answer shadowed)", load.outcomes,
                                 None, note=f"write retries {retried}, records dropped {dropped}; "
                                            f"replica log says the disk is full: {DISK_FULL in logs}")
    record(row)
    assert row.failed == 0, Counter(o.status for o in load.outcomes if o.failed)
    assert retried > 0, "the full disk never showed in cascade_queue_retried"
    assert DISK_FULL in logs, "the replica logs do not say the disk is full"
