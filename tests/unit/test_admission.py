"""Admission under load (serving/student_queue.py): a closed loop queues; arrivals past capacity are refused.

A discrete-event simulation, no Ray and no threads. The event loop runs on virtual time (a wait for the next
timer moves the clock instead of sleeping), the student's worker thread answers a call a fixed time per text
after it starts while the loop goes on, and a noisy neighbour (the load generator, HAProxy, the other replica)
holds the student's core between batches. Each run is deterministic, so a refusal is never luck.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from routing.policy import DeferralPolicy, Route
from serving.cascade import Overloaded, Snapshot
from serving.deployment import DEPLOYMENT_OPTIONS
from serving.settings import GatewayConfig, LimitSettings
from serving.student_queue import ModelTime
from tests.fakes import BlockedStudent, FakeStudent, FakeTeacher, make_cascade, run
from tests.fakes import fake_bundle as bundle

MODEL_S_PER_TEXT = 0.003  # the default student on the 2-core development machine
LIMITS = LimitSettings()
ADMISSION_LIMIT = LIMITS.admission_limit(DEPLOYMENT_OPTIONS["Gateway"]["max_ongoing_requests"])


class _TimerSelector(selectors.DefaultSelector):
    """Never blocks: the loop asks to wait until its next timer, and the virtual clock jumps there."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self.loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise RuntimeError("deadlock: nothing ready and no timer pending")
        self.loop.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_TimerSelector(self))

    def time(self) -> float:
        return self.now


class TimedStudent(FakeStudent):
    """The student whose call takes ``MODEL_S_PER_TEXT`` per text of virtual time, on its worker thread."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self.loop = loop
        self._executor = WorkerThread(loop)

    def run(self, texts: list[str]) -> np.ndarray:
        self.loop.now += MODEL_S_PER_TEXT * len(texts)
        return super().run(texts)


class WorkerThread(concurrent.futures.Executor):
    """The student's one worker thread in virtual time: a call's time passes on this thread, not the event loop's,
    which keeps running meanwhile; calls queue behind each other."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self.loop = loop
        self.free_at = 0.0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        started = self.loop.now
        value = fn(*args, **kwargs)  # moves the clock by the call's time...
        took, self.loop.now = self.loop.now - started, started  # ...which was this thread's, not the loop's
        self.free_at = max(started, self.free_at) + took
        self.loop.call_at(self.free_at, future.set_result, value)
        return future


@dataclass
class Outcome:
    arrived: float
    finished: float
    refused: str | None  # None: answered

    @property
    def seconds(self) -> float:
        return self.finished - self.arrived


class Replica:
    """One gateway replica's request path as serving/gateway.py drives it: the admission limit on requests in
    flight, then the cascade, with a 503 for ``Overloaded``."""

    def __init__(self, loop: VirtualTimeLoop, wall_per_model: float = 1.0, **limits: Any) -> None:
        self.loop = loop
        self.cascade = make_cascade(fake_student=TimedStudent(loop), clock=loop.time, limits=limits)
        self.cascade.max_ongoing_requests = lambda: DEPLOYMENT_OPTIONS["Gateway"]["max_ongoing_requests"]
        self.batch_sizes: list[int] = []
        batcher = self.cascade.students.batcher
        run_batch = batcher.run_batch

        async def beside_a_neighbour(items: list) -> list[np.ndarray | None]:
            # Between batches the core is someone else's: wall time per batch is wall_per_model x model time.
            self.batch_sizes.append(len(items))
            await asyncio.sleep((wall_per_model - 1.0) * MODEL_S_PER_TEXT * len(items))
            return await run_batch(items)

        batcher.run_batch = beside_a_neighbour
        self.outcomes: list[Outcome] = []

    async def request(self, texts: list[str], arrived: float | None = None) -> None:
        """One request that arrived at ``arrived`` (default now), answered or refused."""
        arrived = self.loop.time() if arrived is None else arrived
        try:
            with self.cascade.admitted():
                await self.cascade.classify(texts, Route.STUDENT, started=arrived)
            refused = None
        except Overloaded as exc:
            refused = str(exc)
        self.outcomes.append(Outcome(arrived, self.loop.time(), refused))


def simulate(scenario: Callable[[Replica], Any], wall_per_model: float = 1.0, **limits: Any) -> Replica:
    loop = VirtualTimeLoop()
    try:
        replica = Replica(loop, wall_per_model, **limits)
        loop.run_until_complete(scenario(replica))
        return replica
    finally:
        loop.close()


def closed_loop(users: int, rounds: int) -> Callable[[Replica], Any]:
    """``users`` clients, each sending one-text requests back to back: a new one as soon as it is answered."""

    async def scenario(replica: Replica) -> None:
        async def user(k: int) -> None:
            for r in range(rounds):
                await replica.request([f"sure {k}.{r}"])

        await asyncio.gather(*(user(k) for k in range(users)))

    return scenario


def open_loop(rate: float, seconds: float, texts: int = 1) -> Callable[[Replica], Any]:
    """Requests arriving at ``rate`` per second whatever the answers (a load generator at a fixed rate). Those due
    while the event loop was held (a lone request's inline student call) start together, as from the kernel's
    accept queue, each with its true arrival time."""

    async def scenario(replica: Replica) -> None:
        sent, due = [], [i / rate for i in range(round(rate * seconds))]
        while due:
            await asyncio.sleep(max(0.0, due[0] - replica.loop.time()))
            while due and due[0] <= replica.loop.time():
                batch = [f"sure {len(sent)}.{j}" for j in range(texts)]
                sent.append(asyncio.ensure_future(replica.request(batch, arrived=due.pop(0))))
        await asyncio.gather(*sent)

    return scenario


def texts_of(outcomes: list[Outcome], texts_per_request: int = 1) -> int:
    return texts_per_request * sum(o.refused is None for o in outcomes)


# -- (a) a closed loop queues ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("users", "wall_per_model"), [(64, 5.0), (96, 5.0), (ADMISSION_LIMIT, 1.5)],
                         ids=["64-users-neighbour-5x", "96-users-neighbour-5x", "admission-limit-neighbour-1.5x"])
def test_a_closed_loop_up_to_the_admission_limit_is_never_refused(users: int, wall_per_model: float) -> None:
    """Up to the admission limit of one-text users, each asking again as soon as it is answered, while something
    else holds the student's core between batches so that wall time per batch is a multiple of the model's. The
    queue's wall time per text (15 ms at 5x) times the texts ahead exceeds half the deadline at 96 users, which is
    what refused ordinary load before; the queue itself never waits that long, so nothing is refused."""
    replica = simulate(closed_loop(users, rounds=10), wall_per_model)
    refused = [o.refused for o in replica.outcomes if o.refused]
    assert len(replica.outcomes) == users * 10
    assert not refused, f"{len(refused)} refused, e.g. {refused[0]}"
    assert max(o.seconds for o in replica.outcomes) < LIMITS.queue_deadline_s
    assert max(replica.batch_sizes) == GatewayConfig().student.max_batch_size  # the backlog ran in full batches


# -- (b) arrivals past capacity are refused on arrival; the accepted keep their latency ------------------------
@pytest.mark.parametrize(("rate", "texts", "wall_per_model"), [(31, 32, 1.0), (16, 32, 2.0), (500, 1, 2.0)],
                         ids=["32-texts-3x", "32-texts-3x-neighbour-2x", "one-text-3x-neighbour-2x"])
def test_arrivals_past_capacity_are_refused_on_arrival_and_the_accepted_keep_their_deadline(
        rate: float, texts: int, wall_per_model: float) -> None:
    seconds = 4.0
    capacity = 1 / (MODEL_S_PER_TEXT * wall_per_model)  # texts per second the student drains
    assert rate * texts > 2.9 * capacity
    replica = simulate(open_loop(rate, seconds, texts), wall_per_model)
    refused = [o for o in replica.outcomes if o.refused]
    accepted = [o for o in replica.outcomes if o.refused is None]
    assert len(refused) > len(replica.outcomes) / 2
    assert all(o.seconds == 0 for o in refused), "a refusal came after waiting (shed at the deadline)"
    assert max(o.seconds for o in accepted) <= LIMITS.queue_deadline_s
    # Refusing no more than needed: the student stayed busy with what was accepted.
    busy_until = max(o.finished for o in replica.outcomes)
    assert texts_of(replica.outcomes, texts) >= 0.95 * capacity * busy_until


@pytest.mark.parametrize(("rate", "wall_per_model"), [(8, 1.0), (4, 2.0)], ids=["quiet", "neighbour-2x"])
def test_arrivals_below_capacity_are_all_served(rate: float, wall_per_model: float) -> None:
    replica = simulate(open_loop(rate, 4.0, texts=32), wall_per_model)
    assert rate * 32 < 0.8 / (MODEL_S_PER_TEXT * wall_per_model)
    assert all(o.refused is None for o in replica.outcomes)


# -- (c) the estimate is the model's own time ------------------------------------------------------------------
def test_the_time_per_text_is_the_models_not_the_queues_wall_time() -> None:
    """Wall time per text is 5x the model's here (the neighbour holds the core between batches); admission's
    estimate stays at the model's own, so it does not refuse a backlog the model drains in time."""
    replica = simulate(closed_loop(96, rounds=10), wall_per_model=5.0)
    wall_per_text = max(o.finished for o in replica.outcomes) / texts_of(replica.outcomes)
    assert wall_per_text == pytest.approx(5 * MODEL_S_PER_TEXT, rel=0.05)
    assert replica.cascade.students.model_time.per_text == pytest.approx(MODEL_S_PER_TEXT)


def test_the_model_time_is_a_low_quantile_so_contended_calls_do_not_raise_it() -> None:
    model_time = ModelTime(window=20, quantile=0.1)
    assert model_time.per_text is None
    model_time.observe(0.5, 0)  # nothing run: nothing learned
    assert model_time.per_text is None
    for call in range(20):
        slowed = call % 3 == 0  # a third of the calls share the core with something else
        model_time.observe((0.012 if slowed else 0.003) * 32, 32)
    assert model_time.per_text == pytest.approx(0.003)
    for _ in range(20):  # the window moves on: a slower student is learned within a window of calls
        model_time.observe(0.006 * 32, 32)
    assert model_time.per_text == pytest.approx(0.006)


def test_a_queue_that_is_not_draining_refuses_on_its_oldest_texts_age() -> None:
    """With no model time measured yet (no estimate at all), a queue whose oldest text has waited past the share
    of the deadline refuses newcomers at once; the texts already queued are still run."""

    async def scenario(replica: Replica) -> None:
        cascade, loop = replica.cascade, replica.loop
        cascade.in_flight = 2  # busy: texts go through the batch queue
        stuck = asyncio.get_running_loop().create_future()

        async def stalled(items: list) -> list:
            await stuck  # the student call hangs (a stall, a page fault storm, a core taken away)
            return [np.zeros(2)] * len(items)

        cascade.students.batcher.run_batch = stalled
        first = asyncio.ensure_future(cascade._student(cascade.snapshot, ["sure a"], loop.time() + 10))
        await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(cascade._student(cascade.snapshot, ["sure b"], loop.time() + 10))
        await asyncio.sleep(LIMITS.admission_wait_share * LIMITS.queue_deadline_s - 0.01)
        assert cascade.students.model_time.per_text is None
        admitted = asyncio.ensure_future(replica.request(["sure c"]))  # the oldest has waited just under the share
        await asyncio.sleep(0.02)
        await replica.request(["sure d"])  # now over it: refused on arrival
        assert cascade.students.batcher.waiting == 2  # b and c wait; d never joined
        stuck.set_result(None)
        await asyncio.gather(first, queued, admitted)

    replica = simulate(scenario)
    refused, answered = replica.outcomes
    assert refused.refused is not None and "oldest text queued for the student" in refused.refused
    assert refused.seconds == 0
    assert answered.refused is None


# -- the backlog check on a real worker thread ------------------------------------------------------------
@pytest.mark.parametrize("route", [Route.AUTO, Route.STUDENT])
def test_the_requests_own_texts_count_towards_the_backlog(route: Route) -> None:
    """1 running + 4 queued texts at 0.045 s each start within half the 0.5 s deadline (the admission share),
    but with the request's own 2 they would not: refused at once."""
    cascade = make_cascade(FakeTeacher(), limits={"queue_deadline_s": 0.5})
    student = BlockedStudent()
    cascade.snapshot = Snapshot(bundle("v1"), student, DeferralPolicy(threshold=0.9))

    async def scenario() -> str:
        cascade.in_flight = 2
        running = asyncio.create_task(cascade._student(cascade.snapshot, ["sure a"], cascade.clock() + 10))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(cascade._student(cascade.snapshot, ["sure"] * 4, cascade.clock() + 10))
        await asyncio.sleep(0.05)
        cascade.students.model_time.observe(0.045, 1)
        try:
            await cascade.classify(["sure c", "sure d"], route)
            refusal = ""
        except Overloaded as exc:
            refusal = str(exc)
        student.release.set()
        await asyncio.gather(running, queued)
        return refusal

    assert "5 texts queued for the student" in run(scenario())  # 1 running + 4 queued


def test_the_student_cost_per_text_is_measured_on_batched_calls() -> None:
    cascade = make_cascade(FakeTeacher())
    cascade.in_flight = 2
    assert cascade.students.model_time.per_text is None
    run(cascade._student(cascade.snapshot, ["sure a", "sure b"], cascade.clock() + 10))
    assert (cascade.students.model_time.per_text or 0) > 0


