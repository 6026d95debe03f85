"""Opportunistic dynamic batching: whatever has queued while the model was busy runs as the next batch.

Why not ``@serve.batch``: in Ray 2.60 its loop forms the next batch as soon as one request arrives,
then lets it wait for the running batch to finish (``max_concurrent_batches``). With no wait timeout,
every batch under load therefore holds one item and requests run one by one, each waiting behind
the others. A wait timeout only trades that for added latency on every lone request. Here the next batch
is taken when the model becomes free, so a busy model gets full batches and an idle one starts at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class OpportunisticBatcher(Generic[Item, Result]):
    """Calls ``run_batch`` on lists of items, one batch at a time, each as large as what is waiting.

    ``run_batch`` must return one result per item, in order. An exception fails every item of its
    batch and no other. A caller that is cancelled (a timeout) is dropped from batches not yet started.
    ``max_batch_size`` and ``wait_s`` may be changed at any time (live reconfiguration). ``clock`` stamps
    each item as it is queued, for ``oldest_wait``.
    """

    def __init__(self, run_batch: Callable[[list[Item]], Awaitable[Sequence[Result]]], max_batch_size: int,
                 wait_s: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.clock = clock
        self._waiting: deque[tuple[Item, asyncio.Future[Result], float]] = deque()
        self._worker: asyncio.Task[None] | None = None
        self.running = 0  # items in the batch being run

    @property
    def waiting(self) -> int:
        """Items queued for a batch not yet started."""
        return len(self._waiting)

    async def __call__(self, item: Item) -> Result:
        return await self.submit(item)

    def submit(self, item: Item) -> asyncio.Future[Result]:
        """Queue ``item`` now, before the caller awaits anything: a request that checked the backlog
        (``waiting``) and was admitted is counted in it at once, so a burst that arrives in one turn of
        the event loop cannot all pass the check against the same backlog."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future, self.clock()))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())
        return future

    def _next_batch(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        while self._waiting and len(batch) < self.max_batch_size:
            item, future, _ = self._waiting.popleft()
            if not future.done():  # a cancelled caller no longer needs its answer
                batch.append((item, future))
        return batch

    @property
    def backlog(self) -> int:
        """Items that must run before an item queued now starts: the running batch and the queue."""
        return self.running + len(self._waiting)

    @property
    def oldest_wait(self) -> float:
        """Seconds the oldest item still queued has waited (0 when none waits): a wait that happened, not an
        estimate. It keeps growing only while items arrive faster than batches take them; under a closed loop it
        stays below the time the queue takes to serve every client once."""
        while self._waiting and self._waiting[0][1].done():  # cancelled callers wait for nothing
            self._waiting.popleft()
        return self.clock() - self._waiting[0][2] if self._waiting else 0.0

    async def _drain(self) -> None:
        """Runs batches until nothing waits; started by the first caller after an idle spell."""
        while self._waiting:
            if self.wait_s > 0 and len(self._waiting) < self.max_batch_size:
                await asyncio.sleep(self.wait_s)
            batch = self._next_batch()
            if not batch:
                continue
            self.running = len(batch)
            try:
                results = await self.run_batch([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self.running = 0
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
