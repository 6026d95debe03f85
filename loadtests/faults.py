"""Open-loop load that records every request, for the fault suite (tests/faults): HTTP only.

Requests leave at a fixed arrival rate whether or not earlier ones were answered (no coordinated omission),
each one classified from its answer alone, so a fault shows as failed, refused or degraded requests and as
latency, and its end as the moment answers are healthy again.
"""

from __future__ import annotations

import asyncio
import json
import math
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

    @property
    def refused(self) -> bool:
        """An overload refusal as the API promises it: 503 or 429, a JSON body and Retry-After."""
        return self.status in (429, 503) and self.json_body and self.retry_after is not None

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
        latency = self.now() - sent
        try:
            payload = response.json()
            is_json = True
        except (json.JSONDecodeError, UnicodeDecodeError):
            payload, is_json = None, False
        results = payload.get("results", []) if response.status_code == 200 and isinstance(payload, dict) else []
        self.outcomes.append(Outcome(sent, latency, response.status_code,
                                     error=None if response.status_code == 200 else response.text[:200],
                                     retry_after=response.headers.get("retry-after"), json_body=is_json,
                                     results=results, index=i))


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
