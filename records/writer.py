"""Writes teacher answers to the distillation queue without ever slowing or failing a request.

Requests hand records to a bounded in-memory buffer (``queue.Queue``; a full buffer drops the
record, counts it and logs it); one background thread drains it in batches and writes them to the
backend, retrying with backoff (``tenacity``) while the backend is unreachable, so a record that
reached the buffer is kept until the backend takes it or the process dies.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from records.queue import AnswerRecord, QueueBackend, RetentionSettings

logger = logging.getLogger(__name__)


class RecordWriter:
    """Bounded buffer plus one flushing thread; counters for the metrics module."""

    def __init__(self, open_backend: Callable[[], QueueBackend], buffer_size: int = 10_000,
                 flush_interval_s: float = 0.5, batch_size: int = 256,
                 on_written: Callable[[list[AnswerRecord]], None] | None = None,
                 retention: RetentionSettings | None = None, retention_every_s: float = 60.0) -> None:
        self._open_backend = open_backend
        self._backend: QueueBackend | None = None
        self._buffer: queue.Queue[AnswerRecord] = queue.Queue(maxsize=buffer_size)
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._on_written = on_written
        self._retention = retention
        self._retention_every_s = retention_every_s
        self._retention_due = 0.0
        self._closing = threading.Event()
        self._pending = 0
        self.written = 0
        self.dropped = 0
        self.retried = 0
        self._thread = threading.Thread(target=self._run, name="cascade-queue-writer", daemon=True)
        self._thread.start()

    @property
    def backlog(self) -> int:
        """Records accepted but not yet durable in the backend."""
        return self._buffer.qsize() + self._pending

    def submit(self, record: AnswerRecord) -> bool:
        """Never blocks: a full buffer drops the record, counted and logged."""
        try:
            self._buffer.put_nowait(record)
            return True
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("distillation queue buffer full: %d records dropped so far", self.dropped)
            return False

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush what is buffered (bounded by ``timeout_s``) and stop the thread."""
        self._closing.set()
        self._thread.join(timeout_s)
        if self._backend is not None:
            self._backend.close()

    # -- background thread ----------------------------------------------------------------------
    def _next_batch(self) -> list[AnswerRecord]:
        try:
            batch = [self._buffer.get(timeout=self._flush_interval_s)]
        except queue.Empty:
            return []
        while len(batch) < self._batch_size:
            try:
                batch.append(self._buffer.get_nowait())
            except queue.Empty:
                break
        return batch

    def _count_retry(self, state: RetryCallState) -> None:
        self.retried += 1
        exc = state.outcome.exception() if state.outcome else None
        logger.warning("distillation queue unreachable (%s); %d records kept, retrying", exc, self._pending)
        self._backend = None

    def _give_up(self, state: RetryCallState) -> bool:
        # Retry for as long as the process lives; on close, a few more tries and then stop.
        return self._closing.is_set() and state.attempt_number >= 3

    def _write(self, batch: list[AnswerRecord]) -> None:
        if self._backend is None:
            self._backend = self._open_backend()
        self._backend.append(batch)

    def _run(self) -> None:
        retrying = Retrying(wait=wait_exponential(multiplier=0.1, max=5.0), retry=retry_if_exception_type(Exception),
                            stop=self._give_up, before_sleep=self._count_retry, reraise=True)
        while not (self._closing.is_set() and self._buffer.empty()):
            batch = self._next_batch()
            if not batch:
                continue
            self._pending = len(batch)
            try:
                retrying(self._write, batch)
            except Exception as exc:
                logger.error("distillation queue: %d records not written at shutdown: %s", len(batch), exc)
                self.dropped += len(batch)
                self._pending = 0
                return
            self._pending = 0
            self.written += len(batch)
            if self._on_written is not None:
                self._on_written(batch)
            self._apply_retention()

    def _apply_retention(self) -> None:
        """The queue holds user text: trim it by age and size now and then, on the writer's thread."""
        if self._retention is None or self._backend is None or time.monotonic() < self._retention_due:
            return
        self._retention_due = time.monotonic() + self._retention_every_s
        try:
            removed = self._backend.apply_retention(self._retention)
            if removed:
                logger.info("distillation queue retention removed %d records", removed)
        except Exception as exc:  # retention is housekeeping: the next beat tries again
            logger.warning("distillation queue retention failed: %s", exc)
