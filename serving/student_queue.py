"""The student's queue: batches under load, the model's own time per text, and refusal of a backlog.

Ray-free (import-linter keeps it so): the cascade owns one, and unit tests drive it with a fake clock.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np

from bundle.model import Model
from serving.batching import OpportunisticBatcher
from serving.settings import LimitSettings, StudentSettings


class Overloaded(Exception):
    """Over capacity: refused on arrival, or shed after waiting past its deadline before the student ran: 503."""


class StudentCallSink(Protocol):
    def student_call(self, texts: int, seconds: float) -> None: ...


class ModelTime:
    """The student's own seconds per text: a low quantile of its last batched calls.

    Timed around the call itself, so whatever else holds the cores between batches is left out; the low
    quantile also leaves out most calls slowed by contention, and lands on the cost per text of the large
    batches a backlog runs in. Texts ahead times this is a floor of their real drain time, so admission that
    refuses on it refuses only a backlog too long even at that pace.
    """

    def __init__(self, window: int = 64, quantile: float = 0.1) -> None:
        self._samples: deque[float] = deque(maxlen=window)
        self.quantile = quantile
        self.per_text: float | None = None

    def observe(self, seconds: float, texts: int) -> None:
        """One call of ``texts`` texts that took ``seconds`` inside the model."""
        if texts <= 0:
            return
        self._samples.append(seconds / texts)
        ordered = sorted(self._samples)
        self.per_text = ordered[int(self.quantile * (len(ordered) - 1))]


class StudentQueue:
    """Student logits for the cascade: a lone text runs at once, texts under load run in batches, and a
    request the queue cannot start before its deadline is refused on arrival (``refuse_if_backlogged``)."""

    def __init__(self, settings: StudentSettings, limits: LimitSettings, metrics: StudentCallSink,
                 clock: Callable[[], float]) -> None:
        self.metrics, self.clock, self.limits = metrics, clock, limits
        self.model_time = ModelTime()  # admission's floor on how fast the queue drains
        self.batcher: OpportunisticBatcher[tuple[Model, str, float], np.ndarray | None] = OpportunisticBatcher(
            self._run_batch, settings.max_batch_size, settings.batch_wait_timeout_s, clock=clock)

    def configure(self, settings: StudentSettings, limits: LimitSettings) -> None:
        """Live settings: batch size, batch wait, deadlines."""
        self.batcher.max_batch_size = settings.max_batch_size
        self.batcher.wait_s = settings.batch_wait_timeout_s
        self.limits = limits

    async def _timed(self, student: Model, texts: list[str]) -> np.ndarray:
        started = self.clock()
        logits = await student.predict(texts)
        elapsed = self.clock() - started
        self.metrics.student_call(len(texts), elapsed)
        self.model_time.observe(elapsed, len(texts))
        return logits

    async def _run_batch(self, items: list[tuple[Model, str, float]]) -> list[np.ndarray | None]:
        """Run what queued; an item past its deadline is shed (None) instead of run. Items of a batch
        that straddles a swap run on the student their request holds."""
        now = self.clock()
        out: list[np.ndarray | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for index, (student, _, deadline) in enumerate(items):
            if now <= deadline:
                groups.setdefault(id(student), []).append(index)
        for indices in groups.values():
            logits = await self._timed(items[indices[0]][0], [items[i][1] for i in indices])
            for row, index in zip(logits, indices, strict=True):
                out[index] = row
        return out

    async def logits(self, student: Model, texts: list[str], deadline: float, alone: Callable[[], bool]
                     ) -> np.ndarray:
        """Student logits for one request. ``alone()`` says whether no other request is in flight: a lone
        one-text request skips the batch queue (nothing to batch with, and the queue was its largest fixed
        cost). One turn of the loop first, so requests that arrived together count themselves in and a burst
        goes to the batch queue instead of running one by one."""
        if len(texts) == 1 and alone():
            await asyncio.sleep(0)
            if alone():
                return await self._timed(student, texts)
        # Queued synchronously (submit), right after the backlog check: the next request sees these texts.
        rows = await asyncio.gather(*[self.batcher.submit((student, text, deadline)) for text in texts])
        if any(row is None for row in rows):
            raise Overloaded(f"queued longer than {self.limits.queue_deadline_s} s before the student ran")
        return np.stack(rows)

    def refuse_if_backlogged(self, texts: int, deadline: float) -> None:
        """Refuse now (fast 503) only when the student's queue is falling behind: its oldest text has already
        waited more than ``admission_wait_share`` of ``queue_deadline_s`` (a wait that happened, not an
        estimate), or the texts ahead of this request (the running batch, the queue and its own) could not start
        within that share of the time it may wait even at the model's own pace (``ModelTime``: a floor, which
        time spent between batches does not inflate). Queueing such a request would only shed it at its
        deadline, slowly, and slow the rest. A closed loop offers no more than the queue drains, so while the
        admission limit's texts fit in that share neither fires: it queues (the settings show the arithmetic).
        """
        limits, batcher = self.limits, self.batcher
        share = limits.admission_wait_share
        waited = batcher.oldest_wait
        if waited > share * limits.queue_deadline_s:
            raise Overloaded(f"the oldest text queued for the student has waited {waited:.2f} s: more than "
                             f"{share:g} of the {limits.queue_deadline_s:g} s queue deadline")
        per_text, ahead = self.model_time.per_text, batcher.backlog
        if per_text is None or ahead == 0:
            return
        if (ahead + texts) * per_text > share * (deadline - self.clock()):
            raise Overloaded(f"{ahead} texts queued for the student, at least {ahead * per_text:.2f} s of model "
                             f"time: more than {share:g} of the {limits.queue_deadline_s:g} s queue deadline")
