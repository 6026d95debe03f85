"""The cascade's request path (serving/cascade.py) with a fake student and teacher (tests/fakes.py), no Ray."""

import asyncio
from pathlib import Path

import numpy as np
import pytest

from routing.breaker import BreakerState
from routing.policy import DeferralPolicy, Route
from serving.cascade import Cascade, Overloaded, Snapshot
from serving.settings import queue_url
from tests.fakes import SURE, BlockedStudent, FakeStudent, FakeTeacher, make_cascade, run
from tests.fakes import fake_bundle as bundle


def router(fake: FakeTeacher, **config: dict) -> Cascade:
    return make_cascade(fake, **config)


def test_confident_texts_stay_with_the_student_and_unsure_ones_go_to_the_teacher() -> None:
    teacher = FakeTeacher()
    cascade = router(teacher)
    results = run(cascade.classify(["sure a", "hmm b", "sure c"], Route.AUTO))
    assert [r["served_by"] for r in results] == ["student", "teacher", "student"]
    assert teacher.calls == [["hmm b"]]
    assert results[1]["label"] == "pos" and results[1]["teacher_version"] == "teacher-v1"
    assert not any(r["degraded"] for r in results)


def test_a_slow_teacher_gives_degraded_answers_with_the_reason() -> None:
    teacher = FakeTeacher()
    teacher.delay_s = 1.0
    cascade = router(teacher, teacher={"timeout_s": 0.05})
    results = run(cascade.classify(["hmm"], Route.AUTO))
    assert results[0]["served_by"] == "student" and results[0]["degraded"]
    assert results[0]["reason"] == "teacher_timeout"


def test_a_failing_teacher_degrades_and_the_breaker_then_answers_at_once() -> None:
    teacher = FakeTeacher()
    teacher.fail = True
    cascade = router(teacher, teacher={"breaker_failures": 3, "breaker_cooldown_s": 60.0})

    async def scenario() -> list[dict]:
        answers = []
        for _ in range(5):
            answers.extend(await cascade.classify(["hmm"], Route.AUTO))
        return answers

    answers = run(scenario())
    assert [a["reason"] for a in answers] == ["teacher_error"] * 3 + ["teacher_unavailable"] * 2
    assert len(teacher.calls) == 3  # once open, the dead teacher is not called
    assert cascade.teacher.breaker.state is BreakerState.OPEN


def test_a_dead_teacher_costs_milliseconds_once_the_breaker_is_open() -> None:
    teacher = FakeTeacher()
    teacher.delay_s = 10.0  # a hung teacher: every call would wait out the timeout
    cascade = router(teacher, teacher={"timeout_s": 0.05, "breaker_failures": 2, "breaker_cooldown_s": 60.0})

    async def scenario() -> list[dict]:
        for _ in range(2):
            await cascade.classify(["hmm"], Route.AUTO)
        return await cascade.classify(["hmm"] * 3, Route.AUTO)

    answers = run(scenario())
    assert {a["reason"] for a in answers} == {"teacher_unavailable"}
    assert len(teacher.calls) == 2


def test_the_breaker_closes_after_a_successful_probe() -> None:
    teacher = FakeTeacher()
    teacher.fail = True
    cascade = router(teacher, teacher={"breaker_failures": 1, "breaker_cooldown_s": 0.01})

    async def scenario() -> dict:
        await cascade.classify(["hmm"], Route.AUTO)
        assert cascade.teacher.breaker.state is BreakerState.OPEN
        teacher.fail = False
        await asyncio.sleep(0.02)
        return (await cascade.classify(["hmm"], Route.AUTO))[0]

    answer = run(scenario())
    assert answer["served_by"] == "teacher"
    assert cascade.teacher.breaker.state is BreakerState.CLOSED


def test_a_refusing_teacher_gate_degrades_as_saturated() -> None:
    teacher = FakeTeacher()
    cascade = router(teacher, teacher={"max_concurrency": 0})
    answer = run(cascade.classify(["hmm"], Route.AUTO))[0]
    assert answer["degraded"] and answer["reason"] == "teacher_saturated"
    assert teacher.calls == []


def test_shadow_calls_never_starve_real_deferrals() -> None:
    """Shadow sampling at 100% on a teacher that is slow to answer: every real deferral is still served."""
    teacher = FakeTeacher()
    cascade = router(teacher, teacher={"max_concurrency": 2, "max_share": 1.0},
                     shadow={"share": 1.0, "max_concurrency": 1})

    async def scenario() -> list[dict]:
        teacher.gate = asyncio.Event()
        # Confident texts first: their shadow calls are spawned and block in the teacher.
        await asyncio.gather(*(cascade.classify([f"sure {i}"], Route.AUTO) for i in range(4)))
        await asyncio.sleep(0)
        assert cascade.teacher.gate.shadow_in_flight == 1  # its own small cap, not the real one
        pending = [asyncio.ensure_future(cascade.classify([f"hmm {i}"], Route.AUTO)) for i in range(2)]
        await asyncio.sleep(0.01)
        teacher.gate.set()
        return [r for task in pending for r in await task]

    answers = run(scenario())
    assert [a["served_by"] for a in answers] == ["teacher", "teacher"]
    assert not any(a["degraded"] for a in answers)


def test_a_snapshot_swap_mid_request_keeps_the_request_on_its_snapshot() -> None:
    teacher = FakeTeacher()
    cascade = router(teacher)
    old_student = cascade.snapshot.student
    new_student = FakeStudent(scale=0.01)  # the new model is unsure of everything
    new_snapshot = Snapshot(bundle("v2"), new_student, DeferralPolicy(threshold=0.99, temperature=3.0))

    async def scenario() -> list[dict]:
        teacher.gate = asyncio.Event()
        # Two texts take the batched path, so the request waits for the worker thread while the swap happens.
        request = asyncio.ensure_future(cascade.classify(["sure a", "hmm b"], Route.AUTO))
        await asyncio.sleep(0)
        cascade.snapshot = new_snapshot
        teacher.gate.set()
        return await request

    answers = run(scenario())
    assert {a["student_version"] for a in answers} == {"v1"}
    # The confident text kept the old student's probabilities and the old policy's decision.
    assert answers[0]["served_by"] == "student"
    expected = np.exp(SURE) / np.exp(SURE).sum()
    assert answers[0]["probabilities"]["neg"] == pytest.approx(expected[0])
    assert old_student.calls == 1 and new_student.calls == 0


def test_a_request_queued_past_its_deadline_is_shed_not_run() -> None:
    teacher = FakeTeacher()
    cascade = router(teacher, limits={"queue_deadline_s": 0.05})
    student = cascade.snapshot.student
    with pytest.raises(Overloaded):
        run(cascade.classify(["sure a", "sure b"], Route.AUTO, started=cascade.clock() - 1.0))
    assert student.calls == 0

    async def batch_behind_a_slow_one() -> None:
        # The deadline passes while the request waits in the batch queue.
        cascade.in_flight = 2
        started = cascade.clock()
        await asyncio.sleep(0.1)
        await cascade._student(cascade.snapshot, ["sure a", "sure b"], started + 0.05)

    with pytest.raises(Overloaded):
        run(batch_behind_a_slow_one())
    assert student.calls == 0
    assert run(cascade.classify(["sure a", "sure b"], Route.AUTO))[0]["served_by"] == "student"


def test_a_request_that_could_not_start_before_its_deadline_is_refused_at_once() -> None:
    """With texts queued ahead that take longer than the queue deadline, a new request is refused on arrival
    (before queueing, so the refusal is fast) instead of waiting to be shed; once the queue drains it is served."""
    cascade = router(FakeTeacher(), limits={"queue_deadline_s": 0.5})
    student = BlockedStudent()
    cascade.snapshot = Snapshot(bundle("v1"), student, DeferralPolicy(threshold=0.9))

    async def scenario() -> tuple[str, int, list[dict]]:
        cascade.in_flight = 2  # busy: texts go through the batch queue
        running = asyncio.create_task(cascade._student(cascade.snapshot, ["sure a"], cascade.clock() + 10))
        await asyncio.sleep(0.05)  # that batch is now blocked in the worker thread
        queued = asyncio.create_task(cascade._student(cascade.snapshot, ["sure"] * 8, cascade.clock() + 10))
        await asyncio.sleep(0.05)
        assert cascade.students.batcher.waiting == 8
        cascade.students.model_time.observe(0.1, 1)  # as measured: (1 running + 8 queued + 2) x 0.1 s > half of 0.5 s
        try:
            await cascade.classify(["sure c", "sure d"], Route.AUTO)
            refusal = ""
        except Overloaded as exc:
            refusal = str(exc)
        waiting_after_refusal = cascade.students.batcher.waiting
        student.release.set()
        await asyncio.gather(running, queued)
        return refusal, waiting_after_refusal, await cascade.classify(["sure c", "sure d"], Route.AUTO)

    refusal, waiting, served = run(scenario())
    assert "9 texts queued for the student" in refusal  # the running batch counts too
    assert waiting == 8  # the refused texts never joined the queue
    assert [r["served_by"] for r in served] == ["student", "student"]


def test_a_burst_arriving_together_is_checked_against_the_backlog_it_builds() -> None:
    """Requests that arrive in one turn of the event loop are each counted in the backlog as they are
    admitted, so the ones past the deadline are refused at once instead of all being let in against the same
    (empty) backlog and shed together at the deadline, slowly."""
    cascade = router(FakeTeacher(), limits={"queue_deadline_s": 0.5})
    student = BlockedStudent()
    cascade.snapshot = Snapshot(bundle("v1"), student, DeferralPolicy(threshold=0.9))

    async def scenario() -> tuple[list[object], int]:
        cascade.in_flight = 2  # busy: texts go through the batch queue
        running = asyncio.create_task(cascade._student(cascade.snapshot, ["sure a"], cascade.clock() + 10))
        await asyncio.sleep(0.05)  # that batch is now blocked in the worker thread; nothing waits
        # 1 running, 2 texts each: the 3rd would start 0.28 s from now, past half the 0.5 s deadline.
        cascade.students.model_time.observe(0.04, 1)  # the model's own time per text
        burst = [asyncio.create_task(cascade.classify([f"sure {k}", f"sure {k}!"], Route.AUTO))
                 for k in range(5)]
        await asyncio.sleep(0.05)
        waiting = cascade.students.batcher.waiting
        student.release.set()
        outcomes = await asyncio.gather(*burst, return_exceptions=True)
        await running
        return outcomes, waiting

    outcomes, waiting = run(scenario())
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    assert waiting == 4, "only the requests that can start within their share of the deadline join the queue"
    assert len(refused) == 3 and all("texts queued for the student" in str(o) for o in refused)
    assert sum(isinstance(o, list) for o in outcomes) == 2


def test_gateway_and_cli_resolve_the_queue_the_same_way(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cli.main import _open_queue

    monkeypatch.delenv("CASCADE_QUEUE_URL", raising=False)
    assert queue_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'queue.db'}"
    assert queue_url("sqlite:///elsewhere.db", tmp_path) == "sqlite:///elsewhere.db"
    env = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("CASCADE_QUEUE_URL", env)
    assert queue_url("sqlite:///elsewhere.db", tmp_path) == env
    _open_queue(None, tmp_path).stats()
    assert (tmp_path / "env.db").exists() and not (tmp_path / "queue.db").exists()


# -- a swap and the one-text path ------------------------------------------------------------------
@pytest.mark.parametrize("busy", [False, True], ids=["inline", "batched"])
def test_a_one_text_request_keeps_its_snapshot_across_its_first_loop_turn(busy: bool) -> None:
    cascade = router(FakeTeacher())
    old, new = cascade.snapshot.student, FakeStudent(scale=0.01)

    async def scenario() -> dict:
        request = asyncio.ensure_future(cascade.classify(["sure a"], Route.AUTO))
        await asyncio.sleep(0)  # the request now waits out its one turn of the loop
        cascade.snapshot = Snapshot(bundle("v2"), new, DeferralPolicy(threshold=0.99, temperature=3.0))
        if busy:
            cascade.in_flight = 2  # others arrived meanwhile: it goes through the batch queue
        return (await request)[0]

    answer = run(scenario())
    assert answer["student_version"] == "v1" and answer["served_by"] == "student"
    assert old.calls == 1 and new.calls == 0


# -- shadow calls ----------------------------------------------------------------------------------------
def test_every_finished_shadow_call_gives_its_own_slot_back() -> None:
    teacher = FakeTeacher()
    cascade = router(teacher, teacher={"max_concurrency": 2, "max_share": 1.0},
                     shadow={"share": 1.0, "max_concurrency": 1})

    async def scenario() -> tuple[int, int]:
        for i in range(3):
            await cascade.classify([f"sure {i}"], Route.AUTO)
            await asyncio.gather(*list(cascade._background))
        return cascade.teacher.gate.shadow_in_flight, cascade.teacher.gate.in_flight

    assert run(scenario()) == (0, 0)
    assert teacher.calls == [["sure 0"], ["sure 1"], ["sure 2"]]


# -- the breaker: one probe at a time ---------------------------------------------------
def test_a_half_open_breaker_lets_one_request_probe_the_teacher() -> None:
    teacher = FakeTeacher()
    teacher.fail = True
    cascade = router(teacher, teacher={"breaker_failures": 1, "breaker_cooldown_s": 0.05, "max_share": 1.0})

    async def scenario() -> tuple[int, dict, dict]:
        await cascade.classify(["hmm"], Route.AUTO)  # opens the breaker
        await asyncio.sleep(0.06)
        teacher.fail, teacher.gate = False, asyncio.Event()
        probe = asyncio.ensure_future(cascade.classify(["hmm probe"], Route.AUTO))
        await asyncio.sleep(0.01)
        other = asyncio.ensure_future(cascade.classify(["hmm other"], Route.AUTO))
        await asyncio.sleep(0.01)
        calls = len(teacher.calls)
        teacher.gate.set()
        return calls, (await probe)[0], (await other)[0]

    calls, probe, other = run(scenario())
    assert calls == 2  # the failed call and the one probe
    assert probe["served_by"] == "teacher" and other["reason"] == "teacher_unavailable"


