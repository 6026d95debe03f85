"""The cascade, without Ray: one object for the request path and the replica's life.

``Cascade`` answers texts (student first, the teacher for unsure ones, degraded answers when the teacher
cannot), admits or refuses requests, samples shadow calls, records teacher answers for distillation, swaps to
a promoted bundle, and moves the threshold toward a target agreement. It takes everything it talks to as
injected objects: the student opener and the teacher (``bundle.model.Model``), the queue writer's opener, the
clock and a metrics sink. The Serve deployment (serving/gateway.py) is a thin HTTP adapter over it, and unit
tests drive it with fakes and no Ray (an import-linter contract keeps this module free of Ray).

Consistency across a swap: a promotion replaces one frozen ``Snapshot`` (bundle, student, policy) by
assignment. A request takes the snapshot once and everything downstream (student logits, temperature,
threshold, labels, version) comes from it, so an answer never mixes two models.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from bundle.model import Model, open_model
from bundle.registry import MANIFEST, STUDENT_FILES, Bundle, Registry
from records.queue import feedback_records, open_queue, teacher_answer_records
from records.writer import RecordWriter
from routing.confidence import ConfidenceMeasure, softmax
from routing.controller import ControllerStep, ThresholdController
from routing.estimate import LiveEvidence
from routing.policy import Decision, DeferralPolicy, Route, ShadowSampler
from serving.settings import CostSettings, GatewayConfig, queue_url
from serving.student_queue import Overloaded, StudentQueue
from serving.teacher_guard import GuardedTeacher

__all__ = ["Cascade", "MetricsSink", "Overloaded", "RejectedInput", "Snapshot"]

logger = logging.getLogger("ray.serve")


class MetricsSink(Protocol):
    """What the cascade reports; ``serving.metrics.GatewayMetrics`` exports it through Ray."""

    def student_call(self, texts: int, seconds: float) -> None: ...
    def confidences(self, values: list[float]) -> None: ...
    def disagreed(self, texts: int, source: str) -> None: ...
    def answered(self, results: list[dict[str, Any]], latency_s: float, cost: CostSettings,
                 teacher_texts: int) -> None: ...
    def shadowed(self, texts: int, agreed: int, cost: CostSettings) -> None: ...
    def set_models(self, student_version: str, teacher_version: str) -> None: ...
    def routing_state(self, threshold: float, share: float, budget: float) -> None: ...
    def breaker(self, state: Any) -> None: ...
    def live_estimates(self, agreement: Any, accuracy: Any) -> None: ...
    def queue_counters(self, written: int, dropped: int, retried: int, backlog: int) -> None: ...
    def controller(self, wanted: float | None) -> None: ...


class RejectedInput(ValueError):
    """A request the served bundle cannot take (an unknown label name): a 422 in HTTP."""


class QueueFull(Exception):
    """The queue writer's buffer took only ``queued`` of the records: a 503, send the rest again."""

    def __init__(self, queued: int, total: int) -> None:
        super().__init__(f"queue buffer full: {queued} of {total} texts queued, send the rest again later")
        self.queued, self.total = queued, total


@dataclass(frozen=True)
class Snapshot:
    """What one request is answered with; replaced whole on a swap, never changed in place."""

    bundle: Bundle
    student: Model
    policy: DeferralPolicy


StudentOpener = Callable[[Bundle, int], Model]
WriterOpener = Callable[[str, GatewayConfig], RecordWriter]


def open_onnx_student(bundle: Bundle, threads: int) -> Model:
    return open_model("student-onnx", bundle, threads)


def open_record_writer(url: str, config: GatewayConfig) -> RecordWriter:
    return RecordWriter(lambda: open_queue(url), config.queue.buffer_size, config.queue.flush_interval_s,
                        retention=config.queue.retention)


def result(bundle: Bundle, probs: np.ndarray, confidence: float, served_by: str, reason: str | None,
           teacher_version: str | None, degraded: bool = False) -> dict[str, Any]:
    """One answer of the v1 API."""
    labels = bundle.manifest.labels
    return {
        "label": labels[int(np.argmax(probs))],
        "probabilities": {label: float(p) for label, p in zip(labels, probs, strict=True)},
        "confidence": confidence,
        "served_by": served_by,
        "degraded": degraded,
        "reason": reason,
        "student_version": bundle.version,
        "teacher_version": teacher_version,
    }


def _stack(decisions: list[Decision], indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and confidences of the picked decisions."""
    return (np.stack([decisions[i].probabilities for i in indices]),
            np.array([decisions[i].confidence for i in indices]))


class Cascade:
    """Student inference, deferral, teacher protection, shadow sampling, recording, swaps and the controller."""

    def __init__(self, teacher: Model, metrics: MetricsSink, *, open_student: StudentOpener = open_onnx_student,
                 open_writer: WriterOpener = open_record_writer, clock: Callable[[], float] = time.perf_counter,
                 max_ongoing_requests: Callable[[], int] | None = None) -> None:
        self.metrics, self.clock = metrics, clock
        self.open_student, self.open_writer = open_student, open_writer
        self.max_ongoing_requests = max_ongoing_requests or (lambda: 10**9)
        self.config = GatewayConfig()
        self.snapshot: Snapshot | None = None
        self.teacher = GuardedTeacher(teacher)
        self.students = StudentQueue(self.config.student, self.config.limits, metrics, clock)
        self.shadow = ShadowSampler(0.0)
        self.writer: RecordWriter | None = None
        self._writer_url: str | None = None
        self.evidence = LiveEvidence()  # the live agreement gauges' window
        self.in_flight = 0
        self.shadow_sent = self.shadow_agreed = 0
        # Picked shadow texts and whether the teacher took them (the last 1,000): a refused shadow call
        # (no spare capacity) thins the sample, so a record's probability is the share times this rate.
        self._shadow_outcomes: deque[tuple[int, int]] = deque(maxlen=1000)
        self._background: set[asyncio.Task] = set()
        self._swap_lock = threading.Lock()
        self._controlled_at = clock()
        self.controller_step: ControllerStep | None = None

    # -- the replica's life -----------------------------------------------------------------------------
    @property
    def bundle(self) -> Bundle | None:
        return None if self.snapshot is None else self.snapshot.bundle

    def admission_limit(self) -> int:
        return self.config.limits.admission_limit(self.max_ongoing_requests())

    def reconfigure(self, config: GatewayConfig) -> None:
        """Apply new settings: thresholds, limits, budget, model, queue. Refuses (ValueError) a headroom that
        Ray's ``max_ongoing_requests`` leaves no room for, before changing anything."""
        config.limits.admission_limit(self.max_ongoing_requests())
        self._use_bundle(Registry(config.model.home).load(config.model.version, verify=STUDENT_FILES), config)
        self.configure(config)

    def configure(self, config: GatewayConfig) -> None:
        """Live settings other than the bundle: teacher protection, batching, limits, shadow share, queue."""
        self.teacher.configure(config)
        self.students.configure(config.student, config.limits)
        if self.shadow.share != config.shadow.share:
            self.shadow = ShadowSampler(config.shadow.share)
            self._shadow_outcomes.clear()  # the take rate under another share says nothing about this one
        self._use_queue(queue_url(config.queue.url, config.model.home), config)
        self.config = config

    def _use_queue(self, url: str, config: GatewayConfig) -> None:
        """A new queue URL gets a new writer; the old one flushes what it holds on a thread of its own."""
        if url == self._writer_url:
            return
        old, self.writer, self._writer_url = self.writer, self.open_writer(url, config), url
        if old is not None:
            threading.Thread(target=old.close, daemon=True).start()

    def _use_bundle(self, bundle: Bundle, config: GatewayConfig) -> None:
        """Swap student, bundle and policy together as one frozen snapshot; requests in flight finish on the
        snapshot they took. The same version with the same threads keeps its loaded student."""
        with self._swap_lock:
            current = self.snapshot
            student = None if current is None else current.student
            if (current is None or bundle.version != current.bundle.version
                    or getattr(student, "threads", None) != config.student.threads):
                student = self.open_student(bundle, config.student.threads)
                logger.info("gateway serving student %s", bundle.version)
            manifest = bundle.manifest
            policy = DeferralPolicy(
                threshold=config.routing.threshold if config.routing.threshold is not None else manifest.threshold,
                temperature=manifest.temperatures.student,
                measure=config.routing.confidence_measure or ConfidenceMeasure(manifest.confidence_measure),
            )
            self.snapshot = Snapshot(bundle, student, policy)

    def start(self) -> threading.Thread:
        """The replica's beat on a thread of its own: loading a promoted bundle never holds the event loop."""

        def follow() -> None:
            while True:
                time.sleep(self.config.model.poll_interval_s)
                self.beat()

        thread = threading.Thread(target=follow, name="cascade-follow-current", daemon=True)
        thread.start()
        return thread

    def beat(self) -> None:
        """One beat: publish the gauges, step the threshold controller, swap to a newly promoted version."""
        self._publish_state()
        self.control_threshold()
        self.follow_current()

    def follow_current(self) -> None:
        """Swap to the registry's current version (a promotion or a rollback), or to the same version with a
        rewritten manifest (`cascade calibrate` saves a new threshold); a bad promotion keeps the running one."""
        config = self.config
        if config.model.version is not None:
            return
        try:
            registry, bundle = Registry(config.model.home), self.bundle
            current = registry.current_version()
            if current and bundle is not None and (current != bundle.version or self._manifest_changed(bundle)):
                self._use_bundle(registry.load(current, verify=STUDENT_FILES), config)
        except Exception as exc:
            logger.error("not swapping to the new current model: %s", exc)

    @staticmethod
    def _manifest_changed(bundle: Bundle) -> bool:
        """The served version's manifest on disk differs from the one loaded (one small file read per beat)."""
        try:
            return type(bundle.manifest).model_validate_json((bundle.path / MANIFEST).read_text()) != bundle.manifest
        except (OSError, ValueError):
            return False

    def control_threshold(self) -> None:
        """``routing.target_agreement``: every ``controller.interval_s``, move the threshold toward the cheapest
        one that holds the target on this replica's recent answers (routing/controller.py). Answers of another
        student or teacher version are not evidence about this one; a swap starts again from the bundle's."""
        routing = self.config.routing
        if routing.target_agreement is None or self.clock() - self._controlled_at < routing.controller.interval_s:
            return
        self._controlled_at = self.clock()
        controller = ThresholdController(routing.target_agreement,
                                         **routing.controller.model_dump(exclude={"interval_s"}))
        with self._swap_lock:
            snapshot = self.snapshot
            if snapshot is None:
                return
            evidence = self.evidence.evidence()
            if evidence is not None and (evidence.student_version, evidence.teacher_version) != (
                    snapshot.bundle.version, snapshot.bundle.teacher_version):
                evidence = None
            step = self.controller_step = controller.step(snapshot.policy.threshold, evidence)
            self.metrics.controller(step.wanted)
            if step.threshold != snapshot.policy.threshold:
                policy = dataclasses.replace(snapshot.policy, threshold=step.threshold)
                self.snapshot = Snapshot(snapshot.bundle, snapshot.student, policy)
                logger.info("threshold %.4f -> %.4f (target agreement %.3f; %s)", snapshot.policy.threshold,
                            step.threshold, routing.target_agreement, step.reason)

    def _publish_state(self) -> None:
        """Gauges and queue counters, refreshed on the beat (never on the request path)."""
        snapshot, writer, metrics = self.snapshot, self.writer, self.metrics
        if snapshot is None:
            return
        metrics.set_models(snapshot.bundle.version, snapshot.bundle.teacher_version)
        metrics.routing_state(snapshot.policy.threshold, self.teacher.gate.share(), self.config.teacher.max_share)
        metrics.breaker(self.teacher.breaker.state)
        metrics.live_estimates(*self.evidence.estimate())
        if writer is not None:
            metrics.queue_counters(writer.written, writer.dropped, writer.retried, writer.backlog)

    def status(self) -> dict[str, Any]:
        """What this replica serves now: bundle, live threshold, controller, teacher share, queue, settings."""
        snapshot, writer, step = self.snapshot, self.writer, self.controller_step
        assert snapshot is not None, "no model loaded"
        return {
            "student_version": snapshot.bundle.version,
            "threshold": snapshot.policy.threshold,
            "threshold_controller": None if self.config.routing.target_agreement is None or step is None
            else dataclasses.asdict(step),
            "confidence_measure": snapshot.policy.measure.value,
            "teacher_share": self.teacher.gate.share(),
            "teacher_breaker": self.teacher.breaker.state.value,
            "in_flight": self.in_flight,
            "admission_limit": self.admission_limit(),
            "shadow": {"texts": self.shadow_sent, "agreed": self.shadow_agreed},
            "queue": None if writer is None else {"written": writer.written, "dropped": writer.dropped,
                                                  "retried": writer.retried, "backlog": writer.backlog},
            "config": self.config.model_dump(mode="json"),
        }

    # -- one request --------------------------------------------------------------------------------------
    @contextmanager
    def admitted(self) -> Iterator[None]:
        """One admission limit, below Ray's ``max_ongoing_requests`` so the cascade's refusal fires first."""
        limit = self.admission_limit()
        if self.in_flight >= limit:
            raise Overloaded(f"{self.in_flight} requests in flight, the admission limit of this replica")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def _deadline(self, started: float | None) -> float:
        deadline = (started if started is not None else self.clock()) + self.config.limits.queue_deadline_s
        if self.clock() > deadline:
            raise Overloaded(f"queued longer than {self.config.limits.queue_deadline_s} s before it started")
        return deadline

    async def _student(self, snapshot: Snapshot, texts: list[str], deadline: float) -> np.ndarray:
        return await self.students.logits(snapshot.student, texts, deadline, lambda: self.in_flight <= 1)

    async def classify(self, texts: list[str], route: Route, started: float | None = None) -> list[dict[str, Any]]:
        """Answer ``texts``; ``started`` (this cascade's clock) is when the request arrived, for the queue
        deadline. Raises ``Overloaded`` when refused or shed. Counts the answers in the metrics."""
        snapshot = self.snapshot
        assert snapshot is not None, "no model loaded"
        started = self.clock() if started is None else started
        deadline = self._deadline(started)
        results = None
        if route is Route.TEACHER:
            results, reason = await self._teacher_only(snapshot, texts)
        else:
            self.students.refuse_if_backlogged(len(texts), deadline)
            reason = None
        if results is None:
            results = await self._cascade(snapshot, texts, route, deadline, reason)
        teacher_texts = sum(1 for r in results if r["served_by"] == "teacher")
        self.metrics.answered(results, self.clock() - started, self.config.cost, teacher_texts)
        return results

    async def _teacher_only(self, snapshot: Snapshot, texts: list[str]) -> tuple[list[dict] | None, Any]:
        """Forced teacher: the student is not run unless the teacher fails (then it answers, degraded), so
        "teacher only" costs what the teacher alone costs."""
        answer = await self.teacher.ask(texts, enforce_budget=False)
        if answer.logits is None:
            return None, answer.refused
        bundle = snapshot.bundle
        probs = softmax(answer.logits, bundle.manifest.temperatures.teacher)
        version = answer.version or bundle.teacher_version
        return [result(bundle, row, float(np.max(row)), "teacher", None, version) for row in probs], None

    async def _cascade(self, snapshot: Snapshot, texts: list[str], route: Route, deadline: float,
                       reason: Any) -> list[dict[str, Any]]:
        """Student first; on the auto route, unsure texts to the teacher and a shadow sample of the rest."""
        bundle, policy = snapshot.bundle, snapshot.policy
        decisions = policy.decide(await self._student(snapshot, texts, deadline), route)
        self.metrics.confidences([d.confidence for d in decisions])
        deferred = [i for i, d in enumerate(decisions) if d.to_teacher]
        teacher_probs, teacher_version = None, bundle.teacher_version
        if route is Route.AUTO:
            self.teacher.gate.observe(len(texts))
            if deferred:
                teacher_probs, teacher_version, reason = await self._defer(snapshot, texts, decisions, deferred)
            self._sample_shadow(snapshot, texts, decisions)
        teacher_row = {index: row for row, index in enumerate(deferred)}
        results = []
        for i, decision in enumerate(decisions):
            if i in teacher_row and teacher_probs is not None:
                probs = teacher_probs[teacher_row[i]]
                results.append(result(bundle, probs, float(np.max(probs)), "teacher", None, teacher_version))
            else:
                why = (reason.value if reason else None) if i in teacher_row else None
                results.append(result(bundle, decision.probabilities, decision.confidence, "student",
                                      why, teacher_version, degraded=i in teacher_row))
        return results

    async def _defer(self, snapshot: Snapshot, texts: list[str], decisions: list[Decision], deferred: list[int]
                     ) -> tuple[np.ndarray | None, str, Any]:
        """Ask the teacher about the unsure texts (within the budget) and record its answers."""
        bundle = snapshot.bundle
        answer = await self.teacher.ask([texts[i] for i in deferred], enforce_budget=True)
        if answer.logits is None:
            return None, bundle.teacher_version, answer.refused
        teacher_probs = softmax(answer.logits, bundle.manifest.temperatures.teacher)
        version = answer.version or bundle.teacher_version
        student_probs, confidences = _stack(decisions, deferred)
        self._record([texts[i] for i in deferred], student_probs, teacher_probs, bundle, version, "fallback", 1.0,
                     snapshot.policy.threshold, confidences)
        return teacher_probs, version, None

    # -- the loop back to distillation --------------------------------------------------------------------
    def _sample_shadow(self, snapshot: Snapshot, texts: list[str], decisions: list[Decision]) -> None:
        shadowed = self.shadow.pick([i for i, d in enumerate(decisions) if not d.to_teacher])
        if not shadowed:
            return
        student_probs, confidences = _stack(decisions, shadowed)
        task = asyncio.get_running_loop().create_task(self._shadow(
            [texts[i] for i in shadowed], student_probs, snapshot, confidences, self.shadow.share))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shadow(self, texts: list[str], student_probs: np.ndarray, snapshot: Snapshot,
                      confidences: np.ndarray, share: float) -> None:
        """Ask the teacher about texts the student already answered; the request has gone.
        Only spare teacher capacity is used (``TeacherGate.try_acquire_shadow``)."""
        answer = await self.teacher.ask(texts, enforce_budget=True, shadow=True)
        self._shadow_outcomes.append((len(texts), 0 if answer.logits is None else len(texts)))
        if answer.logits is None:
            return
        picked, taken = (sum(column) for column in zip(*self._shadow_outcomes, strict=True))
        share *= taken / picked  # refusals are taken as independent of the text (they depend on load)
        bundle = snapshot.bundle
        teacher_probs = softmax(answer.logits, bundle.manifest.temperatures.teacher)
        agreed = int((teacher_probs.argmax(-1) == student_probs.argmax(-1)).sum())
        self.shadow_sent += len(texts)
        self.shadow_agreed += agreed
        self.metrics.shadowed(len(texts), agreed, self.config.cost)
        self._record(texts, student_probs, teacher_probs, bundle, answer.version or bundle.teacher_version,
                     "shadow", share, snapshot.policy.threshold, confidences)

    def _record(self, texts: list[str], student_probs: np.ndarray, teacher_probs: np.ndarray, bundle: Bundle,
                teacher_version: str, reason: Literal["fallback", "shadow"], sampling_probability: float,
                threshold: float, confidences: np.ndarray) -> None:
        """Hand the teacher's answers to the queue writer, each with the chance it had of being asked;
        never blocks (a full buffer is counted). The live estimate's window gets every answer."""
        disagreements = int((student_probs.argmax(-1) != teacher_probs.argmax(-1)).sum())
        if disagreements:
            self.metrics.disagreed(disagreements, reason)
        self.evidence.add(np.full(len(texts), 1.0 / sampling_probability), confidences, threshold,
                          student_probs.argmax(-1), teacher_probs.argmax(-1), bundle.version, teacher_version)
        writer = self.writer
        if writer is None:
            return
        for record in teacher_answer_records(texts, student_probs, teacher_probs, bundle.version, teacher_version,
                                             reason, self.config.queue.keep, sampling_probability, threshold,
                                             confidences, agreement_share=self.shadow.share):
            writer.submit(record)

    async def feedback(self, texts: list[str], label_names: list[str]) -> int:
        """Queue texts with their true labels (``/v1/feedback``), with both models' answers for the live
        accuracy estimate; the teacher is asked outside the auto-traffic budget (feedback is small and
        rare), and a teacher that cannot answer leaves its field empty. Returns the records queued;
        raises ``RejectedInput`` on an unknown label and ``QueueFull`` when the buffer took only some."""
        snapshot = self.snapshot
        assert snapshot is not None, "no model loaded"
        bundle, policy = snapshot.bundle, snapshot.policy
        names = bundle.manifest.labels
        unknown = sorted({label for label in label_names if label not in names})
        if unknown:
            raise RejectedInput(f"unknown labels {unknown}; labels: {names}")
        labels = [names.index(label) for label in label_names]
        decisions = policy.decide(await self._student(snapshot, texts, self._deadline(None)), Route.AUTO)
        student_probs, confidences = _stack(decisions, list(range(len(texts))))
        answer = await self.teacher.ask(texts, enforce_budget=False)
        teacher_probs = None if answer.logits is None else softmax(answer.logits,
                                                                  bundle.manifest.temperatures.teacher)
        teacher_version = answer.version or bundle.teacher_version
        deferred = confidences < policy.threshold
        cascade = student_probs.argmax(-1) if teacher_probs is None else np.where(
            deferred, teacher_probs.argmax(-1), student_probs.argmax(-1))
        self.evidence.add_labelled(labels, cascade, bundle.version, teacher_version, student_probs.argmax(-1))
        return self._queue_feedback(feedback_records(texts, labels, student_probs, teacher_probs, bundle.version,
                                                     teacher_version, policy.threshold, confidences))

    def _queue_feedback(self, records: list) -> int:
        writer = self.writer
        if writer is None:
            raise RuntimeError("no distillation queue configured")
        queued = sum(writer.submit(record) for record in records)
        if queued < len(records):
            raise QueueFull(queued, len(records))
        return queued
