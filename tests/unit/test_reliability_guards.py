"""Guards of the reliability fixes that the gateway-logic tests left open, each written against a change that
undoes one fix and passes every other unit test: the one-text path of the swap snapshot, the shadow's own
slots and budget, the checksum cache, the backlog refusal, one breaker probe at a time, the OpenAPI document,
and the Teacher deployment's answers. No Ray cluster: the cascade with a fake teacher, the FastAPI app alone."""

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from bundle import registry as registry_module
from bundle.registry import STUDENT_FILES, BundleError, Registry
from routing.policy import DeferralPolicy, DegradedReason, Route, TeacherGate
from serving.cascade import Overloaded, Snapshot
from serving.settings import LimitSettings
from tests.unit.test_gateway_logic import BlockedStudent, Student, Teacher, bundle, router, run


# -- swap race: the one-text path (B1, B5) ------------------------------------------------------------------
@pytest.mark.parametrize("busy", [False, True], ids=["inline", "batched"])
def test_a_one_text_request_keeps_its_snapshot_across_its_first_loop_turn(busy: bool) -> None:
    cascade = router(Teacher())
    old, new = cascade.snapshot.student, Student(scale=0.01)

    async def scenario() -> dict:
        request = asyncio.ensure_future(cascade.classify_texts(["sure a"], Route.AUTO))
        await asyncio.sleep(0)  # the request now waits out its one turn of the loop
        cascade.snapshot = Snapshot(bundle("v2"), new, DeferralPolicy(threshold=0.99, temperature=3.0))
        if busy:
            cascade.in_flight = 2  # others arrived meanwhile: it goes through the batch queue
        return (await request)[0]

    answer = run(scenario())
    assert answer["student_version"] == "v1" and answer["served_by"] == "student"
    assert old.calls == 1 and new.calls == 0


# -- shadow (D1b, D5) ----------------------------------------------------------------------------------------
def test_every_finished_shadow_call_gives_its_own_slot_back() -> None:
    teacher = Teacher()
    cascade = router(teacher, teacher={"max_concurrency": 2, "max_share": 1.0},
                     shadow={"share": 1.0, "max_concurrency": 1})

    async def scenario() -> tuple[int, int]:
        for i in range(3):
            await cascade.classify_texts([f"sure {i}"], Route.AUTO)
            await asyncio.gather(*list(cascade._background))
        return cascade.gate.shadow_in_flight, cascade.gate.in_flight

    assert run(scenario()) == (0, 0)
    assert teacher.calls == [["sure 0"], ["sure 1"], ["sure 2"]]


def test_shadow_calls_get_no_budget_that_real_deferrals_spent() -> None:
    gate = TeacherGate(max_concurrency=100, max_share=0.1, window_s=10, burst=2, shadow_max_concurrency=100)
    gate.observe(100)
    granted = 0
    while gate.try_acquire(1) is None:
        granted += 1
    assert granted == 12  # the share and the burst, all spent by real deferrals
    assert gate.try_acquire_shadow(1) is DegradedReason.BUDGET


# -- checksums: the cache is used (E4, E4b) ------------------------------------------------------------------
def test_a_verified_file_is_not_hashed_again_while_its_size_and_mtime_hold(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    (staging / "tokenizer").mkdir(parents=True)
    (staging / "student.onnx").write_bytes(b"student")
    (staging / "tokenizer" / "vocab.txt").write_bytes(b"vocab")
    registry = Registry(tmp_path)
    version = registry.publish(staging, {"labels": ["a", "b"], "max_length": 8, "temperatures": {},
                                         "threshold": 0.5}).version
    registry.load(version, verify=STUDENT_FILES)
    student = tmp_path / "registry" / version / "student.onnx"
    stat = student.stat()
    student.write_bytes(b"STUDENT")  # same size; mtime put back: only a hash could tell
    os.utime(student, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    registry.load(version, verify=STUDENT_FILES)  # a cache hit: not hashed, so not refused
    with pytest.raises(BundleError, match=r"student\.onnx"):
        registry.load(version)  # a full verify always hashes
    assert any(Path(entry[0]).name == "student.onnx" for entry in registry_module._VERIFIED)


# -- backlog refusal: own texts, the measurement, the student route (K2, K3, K4) -----------------------------
@pytest.mark.parametrize("route", [Route.AUTO, Route.STUDENT])
def test_the_requests_own_texts_count_towards_the_backlog(route: Route) -> None:
    """1 running + 4 queued texts at 0.045 s each start within half the 0.5 s deadline (the admission share),
    but with the request's own 2 they would not: refused at once."""
    cascade = router(Teacher(), limits={"queue_deadline_s": 0.5})
    student = BlockedStudent()
    cascade.snapshot = Snapshot(bundle("v1"), student, DeferralPolicy(threshold=0.9))

    async def scenario() -> str:
        cascade.in_flight = 2
        running = asyncio.create_task(cascade._student_answer(cascade.snapshot, ["sure a"], cascade.clock() + 10))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(cascade._student_answer(cascade.snapshot, ["sure"] * 4, cascade.clock() + 10))
        await asyncio.sleep(0.05)
        cascade.student_time.observe(0.045, 1)
        try:
            await cascade.classify_texts(["sure c", "sure d"], route)
            refusal = ""
        except Overloaded as exc:
            refusal = str(exc)
        student.release.set()
        await asyncio.gather(running, queued)
        return refusal

    assert "5 texts queued for the student" in run(scenario())  # 1 running + 4 queued


def test_the_student_cost_per_text_is_measured_on_batched_calls() -> None:
    cascade = router(Teacher())
    cascade.in_flight = 2
    assert cascade.student_time.per_text is None
    run(cascade._student_answer(cascade.snapshot, ["sure a", "sure b"], cascade.clock() + 10))
    assert (cascade.student_time.per_text or 0) > 0


# -- breaker: one probe at a time through the cascade (H2) ---------------------------------------------------
def test_a_half_open_breaker_lets_one_request_probe_the_teacher() -> None:
    teacher = Teacher()
    teacher.fail = True
    cascade = router(teacher, teacher={"breaker_failures": 1, "breaker_cooldown_s": 0.05, "max_share": 1.0})

    async def scenario() -> tuple[int, dict, dict]:
        await cascade.classify_texts(["hmm"], Route.AUTO)  # opens the breaker
        await asyncio.sleep(0.06)
        teacher.fail, teacher.gate = False, asyncio.Event()
        probe = asyncio.ensure_future(cascade.classify_texts(["hmm probe"], Route.AUTO))
        await asyncio.sleep(0.01)
        other = asyncio.ensure_future(cascade.classify_texts(["hmm other"], Route.AUTO))
        await asyncio.sleep(0.01)
        calls = len(teacher.calls)
        teacher.gate.set()
        return calls, (await probe)[0], (await other)[0]

    calls, probe, other = run(scenario())
    assert calls == 2  # the failed call and the one probe
    assert probe["served_by"] == "teacher" and other["reason"] == "teacher_unavailable"


# -- the OpenAPI document and 405 (J1-J4): FastAPI app, no Ray ------------------------------------------------
def test_the_openapi_document_states_the_answers_and_limits_of_classify() -> None:
    from serving.gateway import api

    doc = api.openapi()
    classify = doc["paths"]["/v1/classify"]["post"]
    assert {"400", "401", "405", "413", "422", "503"} <= set(classify["responses"])
    assert "Allow" in classify["responses"]["405"]["headers"]
    assert "Retry-After" in classify["responses"]["503"]["headers"]
    assert "404" in doc["paths"]["/v2/models/{name}/infer"]["post"]["responses"]
    texts = classify["requestBody"]["content"]["application/json"]["schema"]["properties"]["texts"]
    limits = LimitSettings()
    assert texts["minItems"] == 1 and texts["maxItems"] == limits.max_texts
    assert texts["items"]["maxLength"] == limits.max_chars


def test_a_wrong_method_is_a_json_405_with_allow() -> None:
    from starlette.testclient import TestClient

    from serving.gateway import api

    answer = TestClient(api).get("/v1/classify")
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"
    assert answer.json()["error"] == "Method Not Allowed"


# -- the Teacher deployment class, no Ray: numpy across the handle, only its own files hashed (F1, E5) -------
@pytest.mark.integration  # the tiny bundle (a model build)
def test_the_teacher_answers_one_array_and_hashes_only_the_teachers_files(tiny_home_copy: Path) -> None:
    from serving.teacher import Teacher as TeacherDeployment

    served = Registry(tiny_home_copy).load(verify=False)
    student = served.path / "student.onnx"
    student.write_bytes(b"not the student")  # the teacher process never loads it
    teacher = TeacherDeployment(model={"home": str(tiny_home_copy)})
    answer = asyncio.run(teacher.classify(["great film", "awful film"]))
    assert isinstance(answer["logits"], np.ndarray)
    assert answer["logits"].shape == (2, len(served.manifest.labels))


# -- the Gateway class itself, no Ray: admission headroom and the files it hashes (C1, E1) --------------------
def gateway_on(home: Path, **user_config: dict):
    """The Gateway deployment's own class (``serve.ingress`` wraps it in an ASGI replica class whose constructor
    needs a running Serve), built as a replica builds it; no teacher handle, since nothing here asks the teacher."""
    from serving.gateway import Gateway

    plain = Gateway.__bases__[0]
    assert plain.__name__ == "Gateway" and plain.__module__ == "serving.gateway"
    config = {"model": {"home": str(home), "poll_interval_s": 3600.0}} | user_config
    return plain(None, config)


def run_in_replica_context(monkeypatch: pytest.MonkeyPatch, max_ongoing_requests: int) -> None:
    """From now on, a Serve replica context whose deployment runs with ``max_ongoing_requests`` (Serve updates
    it live). Only after the gateway is built: Serve's metrics read the rest of a real context."""
    from types import SimpleNamespace

    import ray.serve.context

    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=max_ongoing_requests))
    monkeypatch.setattr(ray.serve.context, "_get_internal_replica_context", lambda: context)


@pytest.mark.parametrize(("headroom", "limit"), [(1, 31), (31, 1), (32, None), (33, None), (500, None)])
def test_the_admission_limit_needs_headroom_below_max_ongoing_requests(headroom: int, limit: int | None) -> None:
    limits = LimitSettings(admission_headroom=headroom)
    if limit is None:
        with pytest.raises(ValueError, match=rf"admission_headroom \({headroom}\) must be below .* \(32\)"):
            limits.admission_limit(32)
    else:
        assert limits.admission_limit(32) == limit


@pytest.mark.integration  # the tiny bundle (a model build)
def test_reconfigure_refuses_a_headroom_at_or_above_the_live_max_ongoing_requests(
        tiny_home_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = gateway_on(tiny_home_copy)
    run_in_replica_context(monkeypatch, 32)
    try:
        assert gateway._max_ongoing_requests() == 32
        config, snapshot, writer = gateway.config, gateway.router.snapshot, gateway.router.writer
        for headroom in (32, 64):
            changed = {"model": {"home": str(tiny_home_copy)}, "limits": {"admission_headroom": headroom},
                       "queue": {"url": f"sqlite:///{tmp_path / 'other.db'}"}}
            with pytest.raises(ValueError, match="admission_headroom"):
                gateway.reconfigure(changed)
            # refused before anything changed: same config, same snapshot, same queue writer
            assert gateway.config is config and gateway.router.snapshot is snapshot
            assert gateway.router.writer is writer
        gateway.reconfigure({"model": {"home": str(tiny_home_copy)}, "limits": {"admission_headroom": 31}})
        assert gateway.config.limits.admission_headroom == 31
        assert gateway.config.limits.admission_limit(gateway._max_ongoing_requests()) == 1
    finally:
        gateway.router.writer.close()


@pytest.mark.integration  # the tiny bundle (a model build)
def test_a_gateway_is_not_built_with_a_headroom_rays_limit_leaves_no_room_for(tiny_home_copy: Path) -> None:
    from serving.app import DEPLOYMENT_OPTIONS

    ongoing = DEPLOYMENT_OPTIONS["Gateway"]["max_ongoing_requests"]  # outside a replica: the deployment's option
    with pytest.raises(ValueError, match=rf"admission_headroom \({ongoing}\) must be below"):
        gateway_on(tiny_home_copy, limits={"admission_headroom": ongoing})


@pytest.mark.integration  # the tiny bundle (a model build)
def test_the_gateway_hashes_only_the_students_files_on_start_and_on_a_swap(tiny_home_copy: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Mirror of the Teacher's guard: teacher weights the gateway never loads are never hashed, also when it swaps
    to a newly promoted version (the follow thread's path)."""
    import shutil
    import time

    registry = Registry(tiny_home_copy)
    first = registry.load(verify=False)
    staging = tmp_path / "staging"
    shutil.copytree(first.path, staging, ignore=shutil.ignore_patterns("manifest.json"))
    second = registry.publish(staging, first.manifest.model_dump(exclude={"version", "created", "files"}),
                              version="v2-same-weights")
    for version in (first, second):  # altered after publishing: a full verify would refuse both versions
        (version.teacher_dir / "model.safetensors").write_bytes(b"not the teacher")

    asked: list[tuple[str | None, object]] = []
    hashed: list[tuple[str, str]] = []
    load, verify_files = Registry.load, registry_module.verify_files

    # Only this test's registry: a Teacher poller left by an earlier test in the process loads its own home.
    def spy_load(self: Registry, version: str | None = None, verify: object = True):
        if self.root == registry.root:
            asked.append((version, verify))
        return load(self, version, verify)

    def spy_verify_files(root: Path, expected: dict[str, str]) -> None:
        if root.parent == registry.root:
            hashed.extend((root.name, relative) for relative in expected)
        verify_files(root, expected)

    monkeypatch.setattr(Registry, "load", spy_load)
    monkeypatch.setattr(registry_module, "verify_files", spy_verify_files)
    gateway = gateway_on(tiny_home_copy, model={"home": str(tiny_home_copy), "poll_interval_s": 0.05})
    try:
        assert gateway.bundle.version == first.version
        registry.current_file.write_text(second.version + "\n")  # `promote` would verify every file, and refuse
        deadline = time.monotonic() + 30
        while gateway.bundle.version != second.version and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gateway.bundle.version == second.version, "the gateway did not swap to the promoted version"
    finally:
        gateway.reconfigure({"model": {"home": str(tiny_home_copy), "poll_interval_s": 3600.0}})
        gateway.router.writer.close()
    assert asked and {verify for _, verify in asked} == {STUDENT_FILES}, asked
    assert {version for version, _ in hashed} == {first.version, second.version}
    assert all(relative == "student.onnx" or relative.startswith("tokenizer/") for _, relative in hashed), hashed
