"""The replica's life in the Ray-free cascade: configuration, the admission limit, swaps, the threshold
controller and the queue writer, driven with a fake clock, fake models and a real registry of placeholder
files (tests/fakes.py). No Ray, no server, no model build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bundle import registry as registry_module
from bundle.registry import STUDENT_FILES, Registry
from routing.policy import Route
from serving.cascade import Cascade
from serving.settings import GatewayConfig, LimitSettings
from tests.fakes import FakeTeacher, ListWriter, RecordingMetrics, open_fake_student, publish_fake_bundle, run


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def life_on(home: Path, max_ongoing: int = 32, clock: Clock | None = None,
            writers: list[ListWriter] | None = None) -> Cascade:
    """A cascade as the Gateway builds one, on ``home``'s registry, with fake models and writers."""
    opened = writers if writers is not None else []

    def open_writer(url: str, config: GatewayConfig) -> ListWriter:
        opened.append(ListWriter())
        return opened[-1]

    return Cascade(FakeTeacher(), RecordingMetrics(), open_student=open_fake_student, open_writer=open_writer,
                   clock=clock or Clock(), max_ongoing_requests=lambda: max_ongoing)


def config_on(home: Path, tmp_path: Path, **settings: object) -> GatewayConfig:
    return GatewayConfig.model_validate({"model": {"home": str(home)},
                                         "queue": {"url": f"sqlite:///{tmp_path / 'queue.db'}"}} | settings)


def served(tmp_path: Path, threshold: float = 0.9, settings: dict | None = None, **life: object
           ) -> tuple[Cascade, Path]:
    """A home with version v1 current, and a cascade configured on it (``life``: ``life_on``'s options)."""
    home = tmp_path / "home"
    publish_fake_bundle(home, "v1", threshold=threshold)
    cascade = life_on(home, **life)
    cascade.reconfigure(config_on(home, tmp_path, **(settings or {})))
    return cascade, home


# The controller's settings in its tests: a step of 0.05 every 30 s once 50 answers are in.
CONTROLLED = {"shadow": {"share": 0.1}, "routing": {"target_agreement": 0.97, "controller": {
    "interval_s": 30.0, "max_step": 0.05, "min_records": 50}}}


# -- the admission limit -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("headroom", "limit"), [(1, 31), (31, 1), (32, None), (33, None), (500, None)])
def test_the_admission_limit_needs_headroom_below_max_ongoing_requests(headroom: int, limit: int | None) -> None:
    limits = LimitSettings(admission_headroom=headroom)
    if limit is None:
        with pytest.raises(ValueError, match=rf"admission_headroom \({headroom}\) must be below .* \(32\)"):
            limits.admission_limit(32)
    else:
        assert limits.admission_limit(32) == limit


def test_reconfigure_refuses_a_headroom_at_or_above_the_live_max_ongoing_requests(tmp_path: Path) -> None:
    writers: list[ListWriter] = []
    cascade, home = served(tmp_path, max_ongoing=32, writers=writers)
    config, snapshot = cascade.config, cascade.snapshot
    for headroom in (32, 64):
        changed = config_on(home, tmp_path / "other", limits={"admission_headroom": headroom})
        with pytest.raises(ValueError, match="admission_headroom"):
            cascade.reconfigure(changed)
        # refused before anything changed: same config, same snapshot, same queue writer
        assert cascade.config is config and cascade.snapshot is snapshot and len(writers) == 1
    cascade.reconfigure(config_on(home, tmp_path, limits={"admission_headroom": 31}))
    assert cascade.admission_limit() == 1


def test_a_request_past_the_admission_limit_is_refused_and_the_slot_comes_back(tmp_path: Path) -> None:
    from serving.cascade import Overloaded

    cascade, _ = served(tmp_path, settings={"limits": {"admission_headroom": 1}}, max_ongoing=3)
    with cascade.admitted(), cascade.admitted():
        assert cascade.in_flight == 2
        with pytest.raises(Overloaded), cascade.admitted():
            pass
    assert cascade.in_flight == 0


# -- swaps: what is hashed, what is reloaded -----------------------------------------------------------------
def test_a_swap_follows_a_promotion_and_hashes_only_the_students_files(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher weights the gateway never loads are never hashed, also when it swaps (the beat's path)."""
    home = tmp_path / "home"
    publish_fake_bundle(home, "v1")
    publish_fake_bundle(home, "v2", promote=False)
    registry = Registry(home)
    for version in ("v1", "v2"):  # altered after publishing: a full verify would refuse both versions
        (registry.root / version / "teacher" / "model.safetensors").write_bytes(b"not the teacher")
    asked: list[object] = []
    load = Registry.load
    monkeypatch.setattr(Registry, "load", lambda self, version=None, verify=True: asked.append(verify)
                        or load(self, version, verify))
    cascade = life_on(home)
    cascade.reconfigure(config_on(home, tmp_path))
    first = cascade.snapshot
    assert first.bundle.version == "v1" and first.student.version == "v1"
    cascade.beat()
    assert cascade.snapshot is first, "no promotion, no swap"
    registry.current_file.write_text("v2\n")  # `promote` would verify every file, and refuse
    cascade.beat()
    assert cascade.snapshot.bundle.version == "v2" and cascade.snapshot.student.version == "v2"
    assert set(asked) == {STUDENT_FILES}
    hashed = {Path(entry[0]).relative_to(registry.root).as_posix() for entry in registry_module._VERIFIED
              if Path(entry[0]).is_relative_to(registry.root)}
    assert hashed and all(path.split("/", 1)[1] in ("student.onnx", "tokenizer/tokenizer.json") for path in hashed)


def test_a_rewritten_manifest_swaps_the_policy_and_keeps_the_loaded_student(tmp_path: Path) -> None:
    cascade, home = served(tmp_path, threshold=0.9)
    student = cascade.snapshot.student
    registry = Registry(home)
    loaded = registry.load("v1")
    registry.save_manifest(loaded, loaded.manifest.model_copy(update={"threshold": 0.7}))
    cascade.beat()
    assert cascade.snapshot.policy.threshold == 0.7
    assert cascade.snapshot.student is student


def test_a_bad_promotion_keeps_the_running_model(tmp_path: Path) -> None:
    cascade, home = served(tmp_path)
    Registry(home).current_file.write_text("v-missing\n")
    cascade.beat()
    assert cascade.snapshot.bundle.version == "v1"


def test_a_new_queue_url_gets_a_new_writer_and_the_old_one_is_closed(tmp_path: Path) -> None:
    import time

    writers: list[ListWriter] = []
    cascade, home = served(tmp_path, writers=writers)
    cascade.reconfigure(config_on(home, tmp_path, routing={"threshold": 0.5}))
    assert len(writers) == 1 and cascade.snapshot.policy.threshold == 0.5
    cascade.reconfigure(config_on(home, tmp_path / "elsewhere"))
    assert len(writers) == 2 and cascade.writer is writers[1]
    deadline = time.monotonic() + 5
    while not writers[0].closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writers[0].closed


# -- the threshold controller on a fake clock ----------------------------------------------------------------
def _disagreeing_traffic(cascade: Cascade, texts: int) -> None:
    """Shadow-style evidence: the teacher (label 1) disagrees with every confident student answer (label 0)."""
    snapshot = cascade.snapshot
    cascade.evidence.add(np.ones(texts), np.full(texts, 0.99), snapshot.policy.threshold, np.zeros(texts, int),
                         np.ones(texts, int), snapshot.bundle.version, snapshot.bundle.teacher_version)


def test_the_controller_moves_the_threshold_one_step_per_interval_on_its_versions_evidence(tmp_path: Path) -> None:
    clock = Clock()
    cascade, _ = served(tmp_path, threshold=0.5, settings=CONTROLLED, clock=clock)
    _disagreeing_traffic(cascade, 200)
    cascade.beat()
    assert cascade.snapshot.policy.threshold == 0.5, "before its interval it does not move"
    clock.now += 31
    cascade.beat()
    assert cascade.snapshot.policy.threshold == pytest.approx(0.55)  # one capped step up, toward quality
    assert cascade.metrics.last["controller"][0] is not None
    assert cascade.status()["threshold_controller"]["threshold"] == pytest.approx(0.55)
    clock.now += 31
    cascade.beat()
    assert cascade.snapshot.policy.threshold == pytest.approx(0.60)


def test_evidence_about_another_version_does_not_move_the_threshold(tmp_path: Path) -> None:
    clock = Clock()
    cascade, _ = served(tmp_path, threshold=0.5, settings=CONTROLLED, clock=clock)
    snapshot = cascade.snapshot
    cascade.evidence.add(np.ones(200), np.full(200, 0.99), 0.5, np.zeros(200, int), np.ones(200, int),
                         "v0-old-student", snapshot.bundle.teacher_version)
    clock.now += 31
    cascade.beat()
    assert cascade.snapshot.policy.threshold == 0.5


# -- the request path over the life's configuration ----------------------------------------------------------
def test_answers_of_a_reconfigured_cascade_are_recorded_to_its_writer(tmp_path: Path) -> None:
    writers: list[ListWriter] = []
    cascade, _ = served(tmp_path, writers=writers)
    results = run(cascade.classify(["hmm", "sure"], Route.AUTO))
    assert [r["served_by"] for r in results] == ["teacher", "student"]
    assert len(writers[0].records) == 1 and writers[0].records[0].text == "hmm"
    assert cascade.metrics.counts["answered"] == 1
