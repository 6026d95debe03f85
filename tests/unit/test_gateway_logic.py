"""The gateway's per-request cascade (serving/cascade.py) with a fake teacher and no Ray cluster.

The student here is a stand-in whose logits are chosen per text, because the routing decisions under
test depend on the student's confidence, which a real tiny model does not let a test choose.
"""

import asyncio
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from bundle.registry import Bundle, Manifest, Registry, Temperatures
from routing.breaker import BreakerState
from routing.policy import DeferralPolicy, Route
from serving.cascade import CascadeRouter, Overloaded, Snapshot
from serving.gateway import MAX_JSON_DEPTH, json_depth_exceeds
from serving.metrics import GatewayMetrics
from serving.settings import GatewayConfig, LimitSettings, queue_url

SURE = np.array([5.0, -5.0])
UNSURE = np.array([0.1, 0.0])


class Student:
    """Confident on texts starting with 'sure', unsure otherwise; ``scale`` tells two versions apart."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.calls = 0

    def logits(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        return np.stack([SURE if t.startswith("sure") else UNSURE for t in texts]) * self.scale


class BlockedStudent(Student):
    """A student whose batch blocks in the worker thread until ``release`` is set (a queue builds behind it)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def logits(self, texts: list[str]) -> np.ndarray:
        self.release.wait(timeout=10)
        return super().logits(texts)


class Teacher:
    """An async teacher that answers label 1, or sleeps, fails, or blocks, as a test sets it."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.delay_s = 0.0
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def __call__(self, texts: list[str]) -> tuple[np.ndarray, str]:
        self.calls.append(list(texts))
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            raise ConnectionError("teacher replica died")
        return np.tile([-3.0, 3.0], (len(texts), 1)), "teacher-v1"


def bundle(version: str) -> Bundle:
    manifest = Manifest(version=version, created="2026-01-01T00:00:00Z", labels=["neg", "pos"], max_length=32,
                        temperatures=Temperatures(), threshold=0.9, files={})
    return Bundle(Path("/nonexistent") / version, manifest)


def router(fake: Teacher, **config: dict) -> CascadeRouter:
    settings = GatewayConfig.model_validate({"shadow": {"share": 0.0}, **config})
    cascade = CascadeRouter(fake, settings, GatewayMetrics())
    cascade.snapshot = Snapshot(bundle("v1"), Student(), DeferralPolicy(threshold=0.9))
    return cascade


def run(coroutine):
    return asyncio.run(coroutine)


def test_confident_texts_stay_with_the_student_and_unsure_ones_go_to_the_teacher() -> None:
    teacher = Teacher()
    cascade = router(teacher)
    results = run(cascade.classify_texts(["sure a", "hmm b", "sure c"], Route.AUTO))
    assert [r["served_by"] for r in results] == ["student", "teacher", "student"]
    assert teacher.calls == [["hmm b"]]
    assert results[1]["label"] == "pos" and results[1]["teacher_version"] == "teacher-v1"
    assert not any(r["degraded"] for r in results)


def test_a_slow_teacher_gives_degraded_answers_with_the_reason() -> None:
    teacher = Teacher()
    teacher.delay_s = 1.0
    cascade = router(teacher, teacher={"timeout_s": 0.05})
    results = run(cascade.classify_texts(["hmm"], Route.AUTO))
    assert results[0]["served_by"] == "student" and results[0]["degraded"]
    assert results[0]["reason"] == "teacher_timeout"


def test_a_failing_teacher_degrades_and_the_breaker_then_answers_at_once() -> None:
    teacher = Teacher()
    teacher.fail = True
    cascade = router(teacher, teacher={"breaker_failures": 3, "breaker_cooldown_s": 60.0})

    async def scenario() -> list[dict]:
        answers = []
        for _ in range(5):
            answers.extend(await cascade.classify_texts(["hmm"], Route.AUTO))
        return answers

    answers = run(scenario())
    assert [a["reason"] for a in answers] == ["teacher_error"] * 3 + ["teacher_unavailable"] * 2
    assert len(teacher.calls) == 3  # once open, the dead teacher is not called
    assert cascade.breaker.state is BreakerState.OPEN


def test_a_dead_teacher_costs_milliseconds_once_the_breaker_is_open() -> None:
    teacher = Teacher()
    teacher.delay_s = 10.0  # a hung teacher: every call would wait out the timeout
    cascade = router(teacher, teacher={"timeout_s": 0.05, "breaker_failures": 2, "breaker_cooldown_s": 60.0})

    async def scenario() -> list[dict]:
        for _ in range(2):
            await cascade.classify_texts(["hmm"], Route.AUTO)
        return await cascade.classify_texts(["hmm"] * 3, Route.AUTO)

    answers = run(scenario())
    assert {a["reason"] for a in answers} == {"teacher_unavailable"}
    assert len(teacher.calls) == 2


def test_the_breaker_closes_after_a_successful_probe() -> None:
    teacher = Teacher()
    teacher.fail = True
    cascade = router(teacher, teacher={"breaker_failures": 1, "breaker_cooldown_s": 0.01})

    async def scenario() -> dict:
        await cascade.classify_texts(["hmm"], Route.AUTO)
        assert cascade.breaker.state is BreakerState.OPEN
        teacher.fail = False
        await asyncio.sleep(0.02)
        return (await cascade.classify_texts(["hmm"], Route.AUTO))[0]

    answer = run(scenario())
    assert answer["served_by"] == "teacher"
    assert cascade.breaker.state is BreakerState.CLOSED


def test_a_refusing_teacher_gate_degrades_as_saturated() -> None:
    teacher = Teacher()
    cascade = router(teacher, teacher={"max_concurrency": 0})
    answer = run(cascade.classify_texts(["hmm"], Route.AUTO))[0]
    assert answer["degraded"] and answer["reason"] == "teacher_saturated"
    assert teacher.calls == []


def test_shadow_calls_never_starve_real_deferrals() -> None:
    """Shadow sampling at 100% on a teacher that is slow to answer: every real deferral is still served."""
    teacher = Teacher()
    cascade = router(teacher, teacher={"max_concurrency": 2, "max_share": 1.0},
                     shadow={"share": 1.0, "max_concurrency": 1})

    async def scenario() -> list[dict]:
        teacher.gate = asyncio.Event()
        # Confident texts first: their shadow calls are spawned and block in the teacher.
        await asyncio.gather(*(cascade.classify_texts([f"sure {i}"], Route.AUTO) for i in range(4)))
        await asyncio.sleep(0)
        assert cascade.gate.shadow_in_flight == 1  # its own small cap, not the real one
        pending = [asyncio.ensure_future(cascade.classify_texts([f"hmm {i}"], Route.AUTO)) for i in range(2)]
        await asyncio.sleep(0.01)
        teacher.gate.set()
        return [r for task in pending for r in await task]

    answers = run(scenario())
    assert [a["served_by"] for a in answers] == ["teacher", "teacher"]
    assert not any(a["degraded"] for a in answers)


def test_a_snapshot_swap_mid_request_keeps_the_request_on_its_snapshot() -> None:
    teacher = Teacher()
    cascade = router(teacher)
    old_student = cascade.snapshot.student
    new_student = Student(scale=0.01)  # the new model is unsure of everything
    new_snapshot = Snapshot(bundle("v2"), new_student, DeferralPolicy(threshold=0.99, temperature=3.0))

    async def scenario() -> list[dict]:
        teacher.gate = asyncio.Event()
        # Two texts take the batched path, so the request waits for the worker thread while the swap happens.
        request = asyncio.ensure_future(cascade.classify_texts(["sure a", "hmm b"], Route.AUTO))
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
    teacher = Teacher()
    cascade = router(teacher, limits={"queue_deadline_s": 0.05})
    student = cascade.snapshot.student
    with pytest.raises(Overloaded):
        run(cascade.classify_texts(["sure a", "sure b"], Route.AUTO, started=cascade.clock() - 1.0))
    assert student.calls == 0

    async def batch_behind_a_slow_one() -> None:
        # The deadline passes while the request waits in the batch queue.
        cascade.in_flight = 2
        started = cascade.clock()
        await asyncio.sleep(0.1)
        await cascade._student_answer(cascade.snapshot, ["sure a", "sure b"], started + 0.05)

    with pytest.raises(Overloaded):
        run(batch_behind_a_slow_one())
    assert student.calls == 0
    assert run(cascade.classify_texts(["sure a", "sure b"], Route.AUTO))[0]["served_by"] == "student"


def test_a_request_that_could_not_start_before_its_deadline_is_refused_at_once() -> None:
    """With texts queued ahead that take longer than the queue deadline, a new request is refused on arrival
    (before queueing, so the refusal is fast) instead of waiting to be shed; once the queue drains it is served."""
    cascade = router(Teacher(), limits={"queue_deadline_s": 0.5})
    student = BlockedStudent()
    cascade.snapshot = Snapshot(bundle("v1"), student, DeferralPolicy(threshold=0.9))

    async def scenario() -> tuple[str, int, list[dict]]:
        cascade.in_flight = 2  # busy: texts go through the batch queue
        running = asyncio.create_task(cascade._student_answer(cascade.snapshot, ["sure a"], cascade.clock() + 10))
        await asyncio.sleep(0.05)  # that batch is now blocked in the worker thread
        queued = asyncio.create_task(cascade._student_answer(cascade.snapshot, ["sure"] * 8, cascade.clock() + 10))
        await asyncio.sleep(0.05)
        assert cascade._student_batcher.waiting == 8
        cascade.student_time.observe(0.1, 1)  # as measured: (1 running + 8 queued + 2) x 0.1 s > half of 0.5 s
        try:
            await cascade.classify_texts(["sure c", "sure d"], Route.AUTO)
            refusal = ""
        except Overloaded as exc:
            refusal = str(exc)
        waiting_after_refusal = cascade._student_batcher.waiting
        student.release.set()
        await asyncio.gather(running, queued)
        return refusal, waiting_after_refusal, await cascade.classify_texts(["sure c", "sure d"], Route.AUTO)

    refusal, waiting, served = run(scenario())
    assert "9 texts queued for the student" in refusal  # the running batch counts too
    assert waiting == 8  # the refused texts never joined the queue
    assert [r["served_by"] for r in served] == ["student", "student"]


def test_a_burst_arriving_together_is_checked_against_the_backlog_it_builds() -> None:
    """Requests that arrive in one turn of the event loop are each counted in the backlog as they are
    admitted, so the ones past the deadline are refused at once instead of all being let in against the same
    (empty) backlog and shed together at the deadline, slowly."""
    cascade = router(Teacher(), limits={"queue_deadline_s": 0.5})
    student = BlockedStudent()
    cascade.snapshot = Snapshot(bundle("v1"), student, DeferralPolicy(threshold=0.9))

    async def scenario() -> tuple[list[object], int]:
        cascade.in_flight = 2  # busy: texts go through the batch queue
        running = asyncio.create_task(cascade._student_answer(cascade.snapshot, ["sure a"], cascade.clock() + 10))
        await asyncio.sleep(0.05)  # that batch is now blocked in the worker thread; nothing waits
        # 1 running, 2 texts each: the 3rd would start 0.28 s from now, past half the 0.5 s deadline.
        cascade.student_time.observe(0.04, 1)  # the model's own time per text
        burst = [asyncio.create_task(cascade.classify_texts([f"sure {k}", f"sure {k}!"], Route.AUTO))
                 for k in range(5)]
        await asyncio.sleep(0.05)
        waiting = cascade._student_batcher.waiting
        student.release.set()
        outcomes = await asyncio.gather(*burst, return_exceptions=True)
        await running
        return outcomes, waiting

    outcomes, waiting = run(scenario())
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    assert waiting == 4, "only the requests that can start within their share of the deadline join the queue"
    assert len(refused) == 3 and all("texts queued for the student" in str(o) for o in refused)
    assert sum(isinstance(o, list) for o in outcomes) == 2


def test_admission_limit_is_derived_below_rays_and_validated() -> None:
    from serving.app import DEPLOYMENT_OPTIONS

    ongoing = DEPLOYMENT_OPTIONS["Gateway"]["max_ongoing_requests"]
    limits = LimitSettings()
    assert 0 < limits.admission_limit(ongoing) < ongoing
    with pytest.raises(ValueError, match="admission_headroom"):
        LimitSettings(admission_headroom=ongoing).admission_limit(ongoing)


def test_deep_json_is_caught_before_the_parser_recurses() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RecursionError):  # the hole: the stdlib parser recurses
        json.loads(deep)
    assert json_depth_exceeds(deep)
    assert json_depth_exceeds(b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1))
    ordinary = json.dumps({"texts": ["[[[[" * 100, "a \\\" [ {"], "inputs": [[["x"]]]}).encode()
    assert not json_depth_exceeds(ordinary)  # brackets inside strings do not count


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


def test_checksums_of_a_subset_are_verified_once_per_process(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    (staging / "tokenizer").mkdir(parents=True)
    (staging / "teacher").mkdir()
    (staging / "student.onnx").write_bytes(b"student")
    (staging / "tokenizer" / "vocab.txt").write_bytes(b"vocab")
    (staging / "teacher" / "model.safetensors").write_bytes(b"teacher")
    registry = Registry(tmp_path)
    version = registry.publish(staging, {"labels": ["a", "b"], "max_length": 8, "temperatures": {},
                                         "threshold": 0.5}).version
    from bundle import registry as registry_module
    from bundle.registry import STUDENT_FILES, BundleError

    teacher_file = tmp_path / "registry" / version / "teacher" / "model.safetensors"
    teacher_file.write_bytes(b"altered")
    registry.load(version, verify=STUDENT_FILES)  # the gateway never loads the teacher: not hashed
    checked = {Path(entry[0]).name for entry in registry_module._VERIFIED}
    assert {"student.onnx", "vocab.txt"} <= checked and "model.safetensors" not in checked
    with pytest.raises(BundleError, match=r"teacher/model\.safetensors"):
        registry.load(version)
    student_file = tmp_path / "registry" / version / "student.onnx"
    student_file.write_bytes(b"STUDENT")  # same size, new mtime: hashed again
    with pytest.raises(BundleError, match=r"student\.onnx"):
        registry.load(version, verify=STUDENT_FILES)
