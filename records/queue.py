"""The distillation queue: teacher answers kept for re-distillation, behind one interface.

Two backends with the same at-least-once contract: ``append`` is durable when it returns;
``lease`` hands records to one consumer for a while; ``ack`` removes them for good, and a lease
that runs out without an ack makes its records visible again (consumers of one queue use one lease
length: Redis decides expiry when a record is claimed, not when it was leased). Retention bounds what is kept by
age and count, since the queue holds user text.

- ``SqliteQueue``: one file, WAL, ``synchronous=FULL`` (durable on commit); the embedded default.
- ``RedisQueue``: a Redis Stream with a consumer group, for deployments of several nodes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field

Reason = Literal["fallback", "shadow", "feedback"]


class AnswerRecord(BaseModel):
    """One text the teacher (or a person, for ``feedback``) answered, with what the models said.

    ``sampling_probability`` is the chance this text had of being recorded (shadow: the shadow share;
    fallback: 1.0, every deferred text is recorded), so records weighted by its inverse stand for all
    traffic (routing/estimate.py). Fields added later have defaults, so older records still load.
    """

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    time: float = Field(default_factory=time.time)
    text: str
    student_probs: list[float]
    teacher_probs: list[float] | None = Field(None, description="None only for feedback the teacher did not answer.")
    student_version: str
    teacher_version: str
    reason: Reason
    disagree: bool = False
    sampling_probability: float = Field(1.0, gt=0.0, le=1.0)
    threshold: float | None = Field(None, description="The live deferral threshold when it was recorded.")
    confidence: float | None = Field(None, description="The student's calibrated confidence (the live measure).")
    label: int | None = Field(None, ge=0, description="The true label (index into the manifest labels), "
                              "from /v1/feedback; in training it outranks the teacher's answer.")


def teacher_answer_records(texts: list[str], student_probs: np.ndarray, teacher_probs: np.ndarray,
                           student_version: str, teacher_version: str, reason: Literal["fallback", "shadow"],
                           keep: Literal["disagreements", "all"], sampling_probability: float = 1.0,
                           threshold: float | None = None, confidences: np.ndarray | None = None,
                           agreement_share: float = 0.0,
                           rng: np.random.Generator | None = None) -> list[AnswerRecord]:
    """One record per text the teacher answered, each with the probability it had of being kept.

    Shadow answers are all kept (agreements too): they are the uniform sample every estimate rests on.
    Fallback disagreements are always kept; fallback agreements all when ``keep`` is ``all``, else a
    random ``agreement_share`` of them (the shadow share), weighted up, so an estimate still sees how
    many deferred texts there were without the queue storing them all.
    """
    disagree = student_probs.argmax(-1) != teacher_probs.argmax(-1)
    scores = student_probs.max(-1) if confidences is None else confidences
    draws = (rng or np.random.default_rng()).random(len(texts))
    records = []
    for text, s, t, d, c, draw in zip(texts, student_probs, teacher_probs, disagree, scores, draws, strict=True):
        probability = sampling_probability
        if reason == "fallback" and not d and keep == "disagreements":
            if draw >= agreement_share:
                continue
            probability = sampling_probability * agreement_share
        records.append(AnswerRecord(
            text=text, student_probs=s.tolist(), teacher_probs=t.tolist(), student_version=student_version,
            teacher_version=teacher_version, reason=reason, disagree=bool(d), sampling_probability=probability,
            threshold=threshold, confidence=float(c)))
    return records


def feedback_records(texts: list[str], labels: list[int], student_probs: np.ndarray, teacher_probs: np.ndarray | None,
                     student_version: str, teacher_version: str, threshold: float,
                     confidences: np.ndarray) -> list[AnswerRecord]:
    """Texts with true labels (``/v1/feedback``), with what both models said (teacher: None if it could not)."""
    rows = [None] * len(texts) if teacher_probs is None else [t.tolist() for t in teacher_probs]
    return [
        AnswerRecord(text=text, student_probs=s.tolist(), teacher_probs=t, student_version=student_version,
                           teacher_version=teacher_version, reason="feedback", label=label,
                           disagree=t is not None and int(np.argmax(s)) != int(np.argmax(t)),
                           threshold=threshold, confidence=float(c))
        for text, label, s, t, c in zip(texts, labels, student_probs, rows, confidences, strict=True)
    ]


class Leased(BaseModel):
    """A record handed to a consumer; ``token`` acknowledges it."""

    token: str
    record: AnswerRecord


class QueueStats(BaseModel):
    backlog: int = Field(description="Records not yet acknowledged (leased or not).")
    leased: int
    oldest_age_s: float | None


class RetentionSettings(BaseModel):
    """How much user text the queue may keep."""

    max_age_s: float = Field(7 * 24 * 3600, gt=0, description="Records older than this are deleted (they hold "
                             "user text).")
    max_records: int = Field(100_000, ge=1, description="Most records kept; the oldest go first.")


class QueueBackend(Protocol):
    def append(self, records: list[AnswerRecord]) -> None: ...
    def lease(self, limit: int, lease_s: float, consumer: str = "distill") -> list[Leased]: ...
    def ack(self, tokens: list[str]) -> int: ...
    def release(self, tokens: list[str]) -> None: ...
    def stats(self) -> QueueStats: ...
    def export(self) -> Iterator[AnswerRecord]: ...
    def purge(self) -> int: ...
    def apply_retention(self, retention: RetentionSettings) -> int: ...
    def close(self) -> None: ...


class SqliteQueue:
    """Embedded queue in one SQLite file (WAL): survives a ``kill -9`` of the writer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS records (id TEXT PRIMARY KEY, created REAL NOT NULL, payload TEXT NOT NULL,"
            " leased_until REAL NOT NULL DEFAULT 0, consumer TEXT)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS records_created ON records (created)")

    def append(self, records: list[AnswerRecord]) -> None:
        rows = [(r.id, r.time, r.model_dump_json()) for r in records]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR IGNORE INTO records (id, created, payload) VALUES (?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite ends the transaction itself on some errors (SQLITE_FULL: "database or disk is full"); a
                # ROLLBACK then fails and its error would hide the one that says what went wrong.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def lease(self, limit: int, lease_s: float, consumer: str = "distill") -> list[Leased]:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT id, payload FROM records WHERE leased_until < ? ORDER BY created LIMIT ?", (now, limit)
                ).fetchall()
                self._db.executemany("UPDATE records SET leased_until = ?, consumer = ? WHERE id = ?",
                                     [(now + lease_s, consumer, row[0]) for row in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [Leased(token=row[0], record=AnswerRecord.model_validate_json(row[1])) for row in rows]

    def ack(self, tokens: list[str]) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            deleted = self._db.executemany("DELETE FROM records WHERE id = ?", [(t,) for t in tokens]).rowcount
            self._db.execute("COMMIT")
        return deleted

    def release(self, tokens: list[str]) -> None:
        """End leases early (a consumer that decided to wait): the records are visible again at once."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("UPDATE records SET leased_until = 0 WHERE id = ?", [(t,) for t in tokens])
            self._db.execute("COMMIT")

    def stats(self) -> QueueStats:
        with self._lock:
            count, oldest = self._db.execute("SELECT COUNT(*), MIN(created) FROM records").fetchone()
            leased = self._db.execute("SELECT COUNT(*) FROM records WHERE leased_until >= ?",
                                      (time.time(),)).fetchone()[0]
        return QueueStats(backlog=count, leased=leased, oldest_age_s=None if oldest is None else time.time() - oldest)

    def export(self) -> Iterator[AnswerRecord]:
        with self._lock:
            rows = self._db.execute("SELECT payload FROM records ORDER BY created").fetchall()
        for (payload,) in rows:
            yield AnswerRecord.model_validate_json(payload)

    def purge(self) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM records").rowcount

    def apply_retention(self, retention: RetentionSettings) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            removed = self._db.execute("DELETE FROM records WHERE created < ?",
                                       (time.time() - retention.max_age_s,)).rowcount
            removed += self._db.execute(
                "DELETE FROM records WHERE id IN (SELECT id FROM records ORDER BY created DESC LIMIT -1 OFFSET ?)",
                (retention.max_records,),
            ).rowcount
            self._db.execute("COMMIT")
        return removed

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisQueue:
    """A Redis Stream with one consumer group: XADD to write, XREADGROUP/XAUTOCLAIM to lease, XACK+XDEL."""

    group = "distill"

    def __init__(self, url: str, stream: str = "cascade:distill") -> None:
        import redis

        self.stream = stream
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._group_ready = False

    def _ensure_group(self) -> None:
        import redis

        if self._group_ready:
            return
        try:
            self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def append(self, records: list[AnswerRecord]) -> None:
        pipe = self._redis.pipeline(transaction=True)
        for record in records:
            pipe.xadd(self.stream, {"record": record.model_dump_json()})
        pipe.execute()

    def lease(self, limit: int, lease_s: float, consumer: str = "distill") -> list[Leased]:
        self._ensure_group()
        # Records whose lease ran out (idle longer than lease_s) come back first, then new ones.
        _, claimed, _ = self._redis.xautoclaim(self.stream, self.group, consumer, min_idle_time=int(lease_s * 1000),
                                               start_id="0-0", count=limit)
        entries = list(claimed)
        if len(entries) < limit:
            fresh = self._redis.xreadgroup(self.group, consumer, {self.stream: ">"}, count=limit - len(entries))
            for _, items in fresh or []:
                entries.extend(items)
        return [Leased(token=entry_id.decode(), record=AnswerRecord.model_validate_json(fields[b"record"]))
                for entry_id, fields in entries if fields]

    def ack(self, tokens: list[str]) -> int:
        if not tokens:
            return 0
        self._ensure_group()
        pipe = self._redis.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *tokens)
        pipe.xdel(self.stream, *tokens)
        return int(pipe.execute()[0])

    def release(self, tokens: list[str], consumer: str = "distill") -> None:
        """End leases early: mark the entries idle for long, so the next lease's XAUTOCLAIM takes them."""
        if tokens:
            self._ensure_group()
            self._redis.xclaim(self.stream, self.group, consumer, 0, tokens, idle=2**40, justid=True)

    def stats(self) -> QueueStats:
        self._ensure_group()
        backlog = int(self._redis.xlen(self.stream))
        leased = int(self._redis.xpending(self.stream, self.group)["pending"])
        first = self._redis.xrange(self.stream, count=1)
        oldest = None
        if first:
            oldest = time.time() - json.loads(first[0][1][b"record"])["time"]
        return QueueStats(backlog=backlog, leased=leased, oldest_age_s=oldest)

    def export(self) -> Iterator[AnswerRecord]:
        for _, fields in self._redis.xrange(self.stream):
            yield AnswerRecord.model_validate_json(fields[b"record"])

    def purge(self) -> int:
        count = int(self._redis.xlen(self.stream))
        self._redis.delete(self.stream)
        self._group_ready = False
        return count

    def apply_retention(self, retention: RetentionSettings) -> int:
        before = int(self._redis.xlen(self.stream))
        min_id = f"{int((time.time() - retention.max_age_s) * 1000)}-0"
        self._redis.xtrim(self.stream, minid=min_id, approximate=False)
        self._redis.xtrim(self.stream, maxlen=retention.max_records, approximate=False)
        return before - int(self._redis.xlen(self.stream))

    def close(self) -> None:
        self._redis.close()


class QueueSettings(BaseModel):
    """Where teacher answers go and which are kept."""

    url: str | None = Field(None, description="sqlite:///path/queue.db or redis://host:port/db; "
                            "None: sqlite in $CASCADE_HOME/queue.db.")
    keep: Literal["disagreements", "all"] = Field("disagreements", description="Which fallback answers are kept; "
                                                  "shadow answers are always all kept (the unbiased sample).")
    buffer_size: int = Field(10_000, ge=1, description="Records held in memory before writes are dropped.")
    flush_interval_s: float = Field(0.5, gt=0, description="How often the writer flushes its buffer to the "
                                    "queue in one batch.")
    retention: RetentionSettings = Field(default_factory=RetentionSettings)


def default_queue_url(home: str | Path) -> str:
    """SQLite beside the registry: one file, for one node."""
    return f"sqlite:///{Path(home).resolve() / 'queue.db'}"


def open_queue(url: str) -> QueueBackend:
    """``sqlite:///abs/path.db``, ``sqlite:relative.db`` or ``redis://...``."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisQueue(url)
    if url.startswith("sqlite:"):
        return SqliteQueue(url.removeprefix("sqlite:").removeprefix("//"))
    raise ValueError(f"unknown queue url {url!r}: use sqlite:///path/queue.db or redis://host:port/db")
