"""A full SQLite queue says so: the error that reaches the writer's log is SQLite's "database or disk is full",
not the failed ROLLBACK after it (SQLite ends the transaction itself on SQLITE_FULL)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from records.queue import AnswerRecord, SqliteQueue


def _record(text: str) -> AnswerRecord:
    return AnswerRecord(text=text, student_probs=[0.4, 0.6], teacher_probs=[0.1, 0.9], student_version="s",
                              teacher_version="t", reason="fallback")


def test_full_database_raises_disk_full_and_keeps_what_was_committed(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "queue.db")
    queue.append([_record("kept")])
    # A page limit is SQLite's own way to reach SQLITE_FULL without filling a real disk (the fault suite does that).
    pages = queue._db.execute("PRAGMA page_count").fetchone()[0]
    queue._db.execute(f"PRAGMA max_page_count = {pages + 1}")
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        queue.append([_record("x" * 2000) for _ in range(50)])
    assert not queue._db.in_transaction
    assert queue.stats().backlog == 1  # the failed batch left nothing behind, the earlier record is intact
