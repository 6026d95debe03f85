"""Open-loop load that records every request, for the fault suite (tests/faults): HTTP only.

Requests leave at a fixed arrival rate whether or not earlier ones were answered (no coordinated omission),
each one classified from its answer alone, so a fault shows as failed, refused or degraded requests and as
latency, and its end as the moment answers are healthy again.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Outcome:
    """One request: when it left (seconds since the load began), how long it took, what came back."""

    sent_s: float
    latency_s: float
    status: int | None  # None: no HTTP answer (connection refused or dropped, timeout)
    error: str | None = None
    retry_after: str | None = None
    json_body: bool = False
    results: list[dict] = field(default_factory=list)
    index: int = -1  # the i given to ``body(i)``
    # False when the generator kept only status and timing (hey): its refusals are counted by status, and the
    # refusal format is checked on httpx probes sent during the same load (``HeyRun.probes``).
    body_seen: bool = True

    @property
    def refused(self) -> bool:
        """An overload refusal as the API promises it: 503 or 429, a JSON body and Retry-After (when seen)."""
        if self.status not in (429, 503):
            return False
        return not self.body_seen or (self.json_body and self.retry_after is not None)

    @property
    def failed(self) -> bool:
        """Anything a client cannot use: no answer, a 5xx that is not a proper refusal, or a 4xx to valid input."""
        return self.status != 200 and not self.refused

    @property
    def degraded_reasons(self) -> list[str]:
        return [result.get("reason") or "unknown" for result in self.results if result.get("degraded")]


class OpenLoop:
    """``rate`` requests per second to ``url`` from a background thread until ``stop`` or ``seconds``.

    ``body(i)`` gives the i-th request's JSON body. Use as a context manager; ``outcomes`` holds every
    finished request. The per-request timeout bounds every request, so nothing hangs the run.
    """

    def __init__(self, url: str, rate: float, seconds: float, body: Callable[[int], dict],
                 headers: dict[str, str] | None = None, timeout_s: float = 10.0, max_connections: int = 512) -> None:
        self.url, self.rate, self.seconds, self.body = url, rate, seconds, body
        self.headers, self.timeout_s, self.max_connections = headers or {}, timeout_s, max_connections
        self.outcomes: list[Outcome] = []
        self.started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> OpenLoop:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def now(self) -> float:
        """Seconds since the load began (the clock of ``Outcome.sent_s``)."""
        return time.monotonic() - self.started

    def stop(self) -> None:
        """Stop sending and wait until every request in flight has its answer or its timeout."""
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 30)

    def wait(self) -> None:
        """Let the load run its full length."""
        self._thread.join(timeout=self.seconds + self.timeout_s + 30)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)
        async with httpx.AsyncClient(headers=self.headers, timeout=self.timeout_s, limits=limits) as client:
            tasks = []
            i = 0
            while not self._stop.is_set():
                due = i / self.rate
                if due >= self.seconds:
                    break
                # Behind schedule, still yield once: a loop that only creates tasks starves the requests it made.
                await asyncio.sleep(max(0.0, due - self.now()))
                tasks.append(asyncio.create_task(self._one(client, i)))
                i += 1
            await asyncio.gather(*tasks)

    async def _one(self, client: httpx.AsyncClient, i: int) -> None:
        sent = self.now()
        try:
            response = await client.post(self.url, json=self.body(i))
        except httpx.HTTPError as exc:
            self.outcomes.append(Outcome(sent, self.now() - sent, None, error=type(exc).__name__, index=i))
            return
        self.outcomes.append(_outcome(response, sent, self.now() - sent, i))


def _outcome(response: httpx.Response, sent_s: float, latency_s: float, index: int) -> Outcome:
    """One answered request, classified from its status, headers and body."""
    try:
        payload = response.json()
        is_json = True
    except (json.JSONDecodeError, UnicodeDecodeError):
        payload, is_json = None, False
    results = payload.get("results", []) if response.status_code == 200 and isinstance(payload, dict) else []
    return Outcome(sent_s, latency_s, response.status_code,
                   error=None if response.status_code == 200 else response.text[:200],
                   retry_after=response.headers.get("retry-after"), json_body=is_json, results=results, index=index)


HEY_MAX_WORKERS = 400  # hey workers (one connection each) across all processes: a few hundred stays light


@dataclass
class HeyRun:
    """What ``hey_load`` sent and saw: every request's outcome, the httpx probes, and how the load was shaped."""

    outcomes: list[Outcome]
    probes: list[Outcome]
    workers: int
    qps_per_worker: int
    processes: int

    @property
    def offered_rate(self) -> int:
        """Requests per second asked of hey (workers x per-worker rate), whatever the answers' pace."""
        return self.workers * self.qps_per_worker


def hey_load(url: str, rate: float, seconds: float, body: dict, headers: dict[str, str] | None = None,
             timeout_s: float = 10.0, processes: int = 8, probes: int = 0) -> HeyRun:
    """``rate`` POSTs per second of ``body`` to ``url`` for ``seconds`` from `hey`, a compiled load generator in
    its own processes, so the load's clock does not share a Python interpreter (or its GIL) with the test.

    Shape: hey's ``-c W -q Q`` runs W workers, each sending one request per 1/Q s and waiting for its answer,
    so W*Q is the most it sends; a worker whose answer takes longer than 1/Q s skips ticks. Q is therefore kept
    low (1 req/s per worker while ``rate`` <= ``HEY_MAX_WORKERS``) and W high (``rate / Q``, at most
    ``HEY_MAX_WORKERS``), so fast refusals and answers under 1/Q s keep the offered rate; the rate achieved is
    the number sent over the span of their send times. A hey process's workers tick in phase (a burst of W
    every 1/Q s), so the workers are split over ``processes`` hey processes started 1/(Q*processes) s apart:
    bursts of W/processes, closer to a steady rate (each burst arrives at a replica within a millisecond).

    hey's CSV (one row per answered request: response-time, ..., status-code, offset) has no headers or bodies,
    so these outcomes have ``body_seen=False``; ``probes`` httpx requests spread over the run (``HeyRun.probes``)
    show what a refusal carries. With ``-n`` each process sends a known count; hey leaves requests without an
    answer (connection error, timeout) out of its CSV, so each missing one is an outcome with status None, sent
    at its process's start, latency NaN (hey records neither). ``sent_s`` is the process's launch (in the clock
    of ``time.monotonic`` from the call) plus hey's offset: off by hey's start-up, a few milliseconds.
    """
    hey = shutil.which("hey")
    if hey is None:
        raise FileNotFoundError("hey (the compiled load generator) is not installed: `make system-deps` installs "
                                "it (Debian package hey)")
    qps = max(1, math.ceil(rate / HEY_MAX_WORKERS))
    workers = max(processes, min(HEY_MAX_WORKERS, round(rate / qps)))
    per_worker = max(1, round(qps * seconds))
    shares = [workers // processes + (1 if k < workers % processes else 0) for k in range(processes)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="hey-body-") as body_file:
        json.dump(body, body_file)
        body_file.flush()
        flags = ["-m", "POST", "-T", "application/json", "-D", body_file.name, "-t", str(max(1, math.ceil(timeout_s))),
                 "-q", str(qps), "-o", "csv"]
        for name, value in (headers or {}).items():
            flags += ["-H", f"{name}: {value}"]
        started = time.monotonic()
        launched: list[tuple[subprocess.Popen[str], float, int]] = []
        try:
            for k, share in enumerate(shares):
                time.sleep(max(0.0, k / (qps * processes) - (time.monotonic() - started)))
                proc = subprocess.Popen([hey, "-n", str(share * per_worker), "-c", str(share), *flags, url],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                launched.append((proc, time.monotonic() - started, share * per_worker))
            probed = _probe(url, body, headers or {}, probes, seconds, timeout_s, started)
            outcomes: list[Outcome] = []
            for proc, launched_at, expected in launched:
                out, err = proc.communicate(timeout=seconds + timeout_s + 60)
                if proc.returncode != 0:
                    raise RuntimeError(f"hey exited {proc.returncode}: {err.strip()[:500]}")
                outcomes += _hey_outcomes(out, launched_at, expected)
        finally:
            for proc, _, _ in launched:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return HeyRun(sorted(outcomes, key=lambda o: o.sent_s), probed, workers, qps, processes)


def _hey_outcomes(csv_text: str, launched_at: float, expected: int) -> list[Outcome]:
    """Outcomes from one hey process's CSV, plus one unanswered outcome per request missing from it."""
    rows = list(csv.DictReader(csv_text.splitlines()))
    needed = {"response-time", "status-code", "offset"}
    if rows and not needed <= set(rows[0]):
        raise RuntimeError(f"hey's CSV lacks {sorted(needed - set(rows[0]))}: a hey with per-request status and "
                           "offset (Debian's 0.1.4 or later) is needed")
    outcomes = [Outcome(launched_at + float(row["offset"]), float(row["response-time"]), int(row["status-code"]),
                        error=None if row["status-code"] == "200" else f"HTTP {row['status-code']}", body_seen=False)
                for row in rows]
    unanswered = "no answer (connection error or timeout; hey records neither its time nor its cause)"
    return outcomes + [Outcome(launched_at, math.nan, None, error=unanswered, body_seen=False)
                       for _ in range(expected - len(rows))]


def _probe(url: str, body: dict, headers: dict[str, str], count: int, seconds: float, timeout_s: float,
           started: float) -> list[Outcome]:
    """``count`` requests spread evenly over the run (from its second second), each recorded whole (status,
    headers, body), so the format of what the load gets back is checked where hey cannot see it."""
    outcomes: list[Outcome] = []
    if count <= 0:
        return outcomes
    with httpx.Client(headers=headers, timeout=timeout_s) as client:
        for k in range(count):
            time.sleep(max(0.0, 1.0 + k * (seconds - 1.0) / count - (time.monotonic() - started)))
            sent = time.monotonic() - started
            try:
                response = client.post(url, json=body)
            except httpx.HTTPError as exc:
                outcomes.append(Outcome(sent, time.monotonic() - started - sent, None, error=type(exc).__name__,
                                        index=k))
                continue
            outcomes.append(_outcome(response, sent, time.monotonic() - started - sent, k))
    return outcomes


def percentile_ms(latencies_s: Sequence[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) in milliseconds; None for no samples."""
    if not latencies_s:
        return None
    ordered = sorted(latencies_s)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return 1000 * ordered[rank]


def recovery_s(outcomes: Sequence[Outcome], fault_at_s: float, unhealthy: Callable[[Outcome], bool]) -> float | None:
    """Seconds from the fault to the end of the last unhealthy request that ended after it (0: none did), so a
    request in flight when the fault struck counts; None if the last request sent was still unhealthy (not
    recovered within the run)."""
    after = sorted((o for o in outcomes if o.sent_s + o.latency_s >= fault_at_s), key=lambda o: o.sent_s)
    bad = [o for o in after if unhealthy(o)]
    if not bad:
        return 0.0
    if after and unhealthy(after[-1]):
        return None
    return bad[-1].sent_s + bad[-1].latency_s - fault_at_s


@dataclass
class FaultRow:
    """One line of the fault table."""

    fault: str
    sent: int
    failed: int
    refused: int
    degraded: dict[str, int]
    p99_ms: float | None
    recover_s: float | None
    note: str = ""

    @classmethod
    def from_outcomes(cls, fault: str, outcomes: Sequence[Outcome], recover_s: float | None,
                      note: str = "") -> FaultRow:
        degraded = Counter(reason for o in outcomes for reason in o.degraded_reasons)
        answered = [o.latency_s for o in outcomes if o.status == 200]
        return cls(fault, len(outcomes), sum(o.failed for o in outcomes), sum(o.refused for o in outcomes),
                   dict(degraded), percentile_ms(answered, 99), recover_s, note)

    def markdown(self) -> str:
        degraded = ", ".join(f"{reason} {count}" for reason, count in sorted(self.degraded.items())) or "0"
        p99 = "-" if self.p99_ms is None else f"{self.p99_ms:.0f}"
        recover = "not within the run" if self.recover_s is None else f"{self.recover_s:.1f}"
        return (f"| {self.fault} | {self.sent} | {self.failed} | {self.refused} | {degraded} | {p99} | {recover} "
                f"| {self.note} |")


TABLE_HEADER = ("| fault | sent | failed | refused (503 JSON + Retry-After) | degraded (by reason) | p99 of answered "
                "(ms) | time to recover (s) | notes |\n|---|---|---|---|---|---|---|---|")


def append_row(path: Path, row: FaultRow) -> None:
    """Add ``row`` to the table in ``path`` (one JSON line per fault, so concurrent writers never clash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        file.write(json.dumps(row.__dict__) + "\n")


def table(rows_path: Path) -> str:
    """The Markdown fault table from the rows recorded in ``rows_path`` (the last row per fault wins)."""
    rows: dict[str, FaultRow] = {}
    if rows_path.is_file():
        for line in rows_path.read_text().splitlines():
            if line.strip():
                row = FaultRow(**json.loads(line))
                rows[row.fault] = row
    return "\n".join([TABLE_HEADER, *(row.markdown() for row in rows.values())])
