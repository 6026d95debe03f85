"""The opportunistic batcher: what waits while the model is busy becomes the next batch (no Ray)."""

import asyncio

import pytest

from serving.batching import OpportunisticBatcher


class Model:
    """Doubles numbers; each batch holds the event loop's attention for a while, like a model call."""

    def __init__(self, seconds: float = 0.02, fail_on: int | None = None, short_by: int = 0) -> None:
        self.seconds, self.fail_on, self.short_by = seconds, fail_on, short_by
        self.batches: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [2 * item for item in items][: len(items) - self.short_by]


def test_arrivals_during_a_running_batch_form_the_next_batch() -> None:
    async def scenario() -> tuple[list[int], Model]:
        model = Model()
        batcher = OpportunisticBatcher(model, max_batch_size=16)
        first = asyncio.create_task(batcher(1))
        await asyncio.sleep(0.005)  # the first batch is running now
        rest = [asyncio.create_task(batcher(n)) for n in (2, 3, 4)]
        return await asyncio.gather(first, *rest), model

    results, model = asyncio.run(scenario())
    assert results == [2, 4, 6, 8]
    assert model.batches == [[1], [2, 3, 4]]


def test_batches_respect_the_live_max_batch_size() -> None:
    async def scenario() -> Model:
        model = Model()
        batcher = OpportunisticBatcher(model, max_batch_size=16)
        batcher.max_batch_size = 2  # reconfigured while running
        await asyncio.gather(*(batcher(n) for n in range(5)))
        return model

    assert asyncio.run(scenario()).batches == [[0, 1], [2, 3], [4]]


def test_a_failing_batch_fails_only_its_callers() -> None:
    async def scenario() -> tuple[list[object], Model]:
        model = Model(fail_on=2)
        batcher = OpportunisticBatcher(model, max_batch_size=2)
        results = await asyncio.gather(*(batcher(n) for n in (1, 2, 3)), return_exceptions=True)
        after = await batcher(5)  # the worker survived the failure
        return [*results, after], model

    results, model = asyncio.run(scenario())
    assert isinstance(results[0], ValueError) and isinstance(results[1], ValueError)
    assert results[2:] == [6, 10]
    assert model.batches == [[1, 2], [3], [5]]


def test_a_wrong_number_of_results_is_an_error_not_a_misaligned_answer() -> None:
    async def scenario() -> None:
        batcher = OpportunisticBatcher(Model(short_by=1), max_batch_size=4)
        await asyncio.gather(batcher(1), batcher(2))

    with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
        asyncio.run(scenario())


def test_a_cancelled_caller_is_left_out_of_the_next_batch() -> None:
    async def scenario() -> Model:
        model = Model()
        batcher = OpportunisticBatcher(model, max_batch_size=16)
        first = asyncio.create_task(batcher(1))
        await asyncio.sleep(0.005)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher(2), timeout=0.001)  # gives up while batch [1] runs
        third = asyncio.create_task(batcher(3))
        await asyncio.gather(first, third)
        return model

    assert asyncio.run(scenario()).batches == [[1], [3]]


def test_a_wait_lets_a_lone_item_collect_company() -> None:
    async def scenario() -> Model:
        model = Model(seconds=0.0)
        batcher = OpportunisticBatcher(model, max_batch_size=8, wait_s=0.05)
        first = asyncio.create_task(batcher(1))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, batcher(2))
        return model

    assert asyncio.run(scenario()).batches == [[1, 2]]


def test_the_backlog_counts_the_running_batch_and_the_oldest_wait_is_the_queues_head() -> None:
    """Admission reads ``backlog`` (the running batch is ahead of a new item too) and ``oldest_wait``: how long
    the oldest item not yet started has waited, on the batcher's clock, not counting cancelled callers."""
    clock = [100.0]

    async def scenario() -> tuple[list[float], list[int]]:
        batcher = OpportunisticBatcher(Model(seconds=0.02), max_batch_size=2, clock=lambda: clock[0])
        waits = [batcher.oldest_wait]  # nothing queued
        first = [batcher.submit(n) for n in (1, 2)]
        await asyncio.sleep(0.005)  # batch [1, 2] is running
        waits.append(batcher.oldest_wait)  # nothing waits behind it
        clock[0] += 1.0
        gone = batcher.submit(3)
        clock[0] += 0.5
        rest = [batcher.submit(n) for n in (4, 5, 6)]
        counts = [batcher.backlog, batcher.waiting]
        waits.append(batcher.oldest_wait)  # item 3, queued 0.5 s ago
        gone.cancel()
        waits.append(batcher.oldest_wait)  # item 4 now heads the queue
        clock[0] += 0.25
        waits.append(batcher.oldest_wait)
        await asyncio.gather(*first, *rest)
        waits.append(batcher.oldest_wait)
        return waits, counts

    waits, counts = asyncio.run(scenario())
    assert counts == [6, 4]  # 2 running + 4 queued
    assert waits == [0.0, 0.0, 0.5, 0.0, 0.25, 0.0]
