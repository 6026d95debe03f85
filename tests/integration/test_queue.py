"""The distillation queue on its real backends: SQLite files and a real redis-server."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from records.queue import AnswerRecord, QueueBackend, RetentionSettings, SqliteQueue, open_queue
from records.writer import RecordWriter
from tests.servers import redis_server

pytestmark = pytest.mark.integration  # a real redis-server


def record(i: int, age_s: float = 0.0) -> AnswerRecord:
    return AnswerRecord(text=f"text {i}", student_probs=[0.4, 0.6], teacher_probs=[0.9, 0.1],
                              student_version="s1", teacher_version="t1", reason="fallback", disagree=True,
                              time=time.time() - age_s)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueBackend]:
    if request.param == "sqlite":
        queue = open_queue(f"sqlite:///{tmp_path / 'queue.db'}")
    else:
        queue = open_queue(request.getfixturevalue("redis_url"))
        queue.purge()
    yield queue
    queue.close()


def test_lease_ack_is_at_least_once(backend: QueueBackend) -> None:
    backend.append([record(i) for i in range(5)])
    first = backend.lease(3, lease_s=60)
    assert len(first) == 3
    # Leased records are invisible to the next consumer while the lease holds.
    second = backend.lease(10, lease_s=60, consumer="other")
    assert {r.token for r in second}.isdisjoint({r.token for r in first})
    assert len(second) == 2
    assert backend.ack([r.token for r in first]) == 3
    stats = backend.stats()
    assert stats.backlog == 2 and stats.leased == 2


def test_expired_lease_comes_back(backend: QueueBackend) -> None:
    backend.append([record(i) for i in range(3)])
    leased = backend.lease(3, lease_s=0.2)
    assert len(leased) == 3
    time.sleep(0.4)
    again = backend.lease(10, lease_s=0.2, consumer="second")
    assert sorted(r.record.text for r in again) == sorted(r.record.text for r in leased)


def test_records_round_trip_and_purge(backend: QueueBackend) -> None:
    originals = [record(i) for i in range(4)]
    backend.append(originals)
    assert [r.model_dump() for r in backend.export()] == [r.model_dump() for r in originals]
    assert backend.purge() == 4
    assert backend.stats().backlog == 0


def test_retention_by_count(backend: QueueBackend) -> None:
    backend.append([record(i) for i in range(10)])
    removed = backend.apply_retention(RetentionSettings(max_records=4))
    assert removed == 6
    assert [r.text for r in backend.export()] == [f"text {i}" for i in range(6, 10)]


def test_sqlite_retention_by_age(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "q.db")
    queue.append([record(0, age_s=7200), record(1, age_s=10)])
    assert queue.apply_retention(RetentionSettings(max_age_s=3600)) == 1
    assert [r.text for r in queue.export()] == ["text 1"]


def test_writer_keeps_records_while_backend_is_down(tmp_path: Path) -> None:
    """Redis is down when the first records arrive; the writer retries and loses none."""
    workdir = tmp_path / "redis"
    workdir.mkdir()
    state: dict[str, str] = {}

    def open_backend() -> QueueBackend:
        if "url" not in state:
            raise ConnectionError("backend not up yet")
        return open_queue(state["url"])

    writer = RecordWriter(open_backend, buffer_size=100, flush_interval_s=0.05)
    for i in range(20):
        assert writer.submit(record(i))
    time.sleep(0.5)
    assert writer.retried > 0 and writer.written == 0 and writer.backlog == 20
    with redis_server(workdir) as url:
        state["url"] = url
        deadline = time.monotonic() + 15
        while writer.written < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        writer.close()
        assert writer.written == 20 and writer.dropped == 0
        assert sorted(r.text for r in open_queue(url).export()) == sorted(f"text {i}" for i in range(20))


def test_full_buffer_counts_drops(tmp_path: Path) -> None:
    def unreachable() -> QueueBackend:
        raise ConnectionError("down")

    writer = RecordWriter(unreachable, buffer_size=5, flush_interval_s=0.05)
    time.sleep(0.1)
    accepted = sum(writer.submit(record(i)) for i in range(20))
    # One batch may sit in the writer's hands; everything else past the buffer is counted as dropped.
    assert accepted + writer.dropped == 20
    assert writer.dropped >= 20 - 5 - 5
    writer._closing.set()


WRITER = textwrap.dedent("""
    import sys, time
    from records.queue import AnswerRecord, SqliteQueue
    from records.writer import RecordWriter

    def written(batch):
        print(" ".join(r.id for r in batch), flush=True)

    writer = RecordWriter(lambda: SqliteQueue(sys.argv[1]), flush_interval_s=0.01, batch_size=7, on_written=written)
    i = 0
    while True:
        writer.submit(AnswerRecord(text=f"t{i}" * 50, student_probs=[0.5, 0.5], teacher_probs=[0.1, 0.9],
                                         student_version="s", teacher_version="t", reason="shadow", disagree=True))
        i += 1
        if i % 50 == 0:
            time.sleep(0.001)
""")


def test_kill_9_loses_no_acknowledged_record(tmp_path: Path) -> None:
    """SIGKILL mid-write: every id the writer reported as committed is in the file, and it opens."""
    db = tmp_path / "queue.db"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    acknowledged: list[str] = []
    assert process.stdout is not None
    while len(acknowledged) < 2000:
        line = process.stdout.readline()
        assert line, "writer exited early"
        acknowledged.extend(line.split())
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {row[0] for row in conn.execute("SELECT id FROM records")}
    assert set(acknowledged) <= stored
