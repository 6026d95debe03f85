"""The per-request cascade, without Ray: student first, the teacher for unsure texts, degraded answers.

Extracted from the Serve ingress so the routing logic can be tested with a fake teacher and no
cluster. The Gateway deployment owns one ``CascadeRouter`` and gives it the teacher as an async
callable (a Serve handle call there, a plain coroutine in tests).

Consistency across a swap: a promotion replaces one frozen ``Snapshot`` (bundle, student runtime,
policy) by assignment. A request takes the snapshot once and everything downstream (student
logits, temperature, threshold, labels, version) comes from it, so an answer never mixes two models.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from bundle.registry import Bundle
from records.queue import feedback_records, teacher_answer_records
from records.writer import RecordWriter
from routing.breaker import CircuitBreaker
from routing.confidence import softmax
from routing.estimate import LiveEvidence
from routing.policy import DeferralPolicy, DegradedReason, Route, ShadowSampler, TeacherGate
from serving.batching import OpportunisticBatcher
from serving.metrics import GatewayMetrics
from serving.settings import GatewayConfig

logger = logging.getLogger("ray.serve")

# The teacher as the router sees it: texts in, (raw logits, teacher version) out.
TeacherCall = Callable[[list[str]], Awaitable[tuple[np.ndarray, str | None]]]


class StudentModel(Protocol):
    def logits(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class Snapshot:
    """What one request is answered with; replaced whole on a swap, never changed in place."""

    bundle: Bundle
    student: StudentModel
    policy: DeferralPolicy


class Overloaded(Exception):
    """Over capacity: refused on arrival, or shed after waiting past its deadline before the student ran: 503."""


class ModelTime:
    """The student's own seconds per text: a low quantile of its last batched calls.

    Timed around the call itself (on the worker thread), so the event loop's turns and whatever else holds the
    cores between batches are left out; the low quantile also leaves out most calls slowed by contention, and
    lands on the cost per text of the large batches a backlog runs in. Texts ahead times this is a floor of
    their real drain time, so admission that refuses on it refuses only a backlog too long even at that pace.
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


class CascadeRouter:
    """Student inference, deferral, teacher protection (gate, breaker, timeout) and shadow sampling."""

    def __init__(self, teacher: TeacherCall, config: GatewayConfig, metrics: GatewayMetrics,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.teacher = teacher
        self.metrics = metrics
        self.clock = clock
        self.snapshot: Snapshot | None = None
        self.gate = TeacherGate(0, 0.0)
        self.breaker = CircuitBreaker()
        self.shadow = ShadowSampler(0.0)
        self.writer: RecordWriter | None = None
        self.in_flight = 0
        self.shadow_sent = 0
        self.shadow_agreed = 0
        self.evidence = LiveEvidence()  # the live agreement gauges' window
        # Picked shadow texts and whether the teacher took them (the last 1,000): a refused shadow call
        # (no spare capacity) thins the sample, so a record's probability is the share times this rate.
        self._shadow_outcomes: deque[tuple[int, int]] = deque(maxlen=1000)
        self._background: set[asyncio.Task] = set()
        # One worker thread: ONNX Runtime work leaves the event loop, which keeps accepting
        # requests (and filling the next batch) while a batch runs.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="student")
        self._student_batcher: OpportunisticBatcher[tuple[StudentModel, str, float], np.ndarray | None] = (
            OpportunisticBatcher(self._student_batch, config.student.max_batch_size,
                                 config.student.batch_wait_timeout_s, clock=clock))
        self.student_time = ModelTime()  # admission's floor on how fast the queue drains
        self.config = config
        self.configure(config)

    def configure(self, config: GatewayConfig) -> None:
        """Apply live settings (not the bundle: ``snapshot`` is assigned by the owner)."""
        teacher = config.teacher
        self.gate.configure(teacher.max_concurrency, teacher.max_share, teacher.max_texts_per_s,
                            teacher.budget_window_s, config.shadow.max_concurrency)
        self.breaker.configure(teacher.breaker_failures, teacher.breaker_cooldown_s)
        if self.shadow.share != config.shadow.share:
            self.shadow = ShadowSampler(config.shadow.share)
            self._shadow_outcomes.clear()  # the take rate under another share says nothing about this one
        self._student_batcher.max_batch_size = config.student.max_batch_size
        self._student_batcher.wait_s = config.student.batch_wait_timeout_s
        self.config = config

    # -- the student ----------------------------------------------------------------------------
    async def _student_batch(self, items: list[tuple[StudentModel, str, float]]) -> list[np.ndarray | None]:
        """Run what queued; an item past its deadline is shed (None) instead of run. Items of a batch
        that straddles a swap run on the student their request holds."""
        now = self.clock()
        out: list[np.ndarray | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for index, (student, _, deadline) in enumerate(items):
            if now <= deadline:
                groups.setdefault(id(student), []).append(index)
        loop = asyncio.get_running_loop()
        for indices in groups.values():
            student = items[indices[0]][0]
            started = self.clock()
            logits = await loop.run_in_executor(self._executor, student.logits, [items[i][1] for i in indices])
            elapsed = self.clock() - started
            self.metrics.student.call(len(indices), elapsed)
            self.student_time.observe(elapsed, len(indices))
            for row, index in zip(logits, indices, strict=True):
                out[index] = row
        return out

    async def _student_answer(self, snapshot: Snapshot, texts: list[str], deadline: float) -> np.ndarray:
        """Student logits from the request's snapshot. A lone one-text request runs inline: with
        nothing else in flight there is nothing to batch with, and the batch queue and worker-thread hop
        were the largest fixed costs on that path (docs/performance.md). Under load, texts are batched
        on the worker thread so the event loop keeps accepting."""
        if len(texts) == 1 and self.in_flight <= 1:
            # One turn of the loop first: requests that arrived together start and count themselves
            # in, so a burst goes to the batch queue instead of running one by one on the loop.
            await asyncio.sleep(0)
        if len(texts) == 1 and self.in_flight <= 1:
            started = self.clock()
            logits = snapshot.student.logits(texts)
            self.metrics.student.call(1, self.clock() - started)
            return logits
        # Queued synchronously (submit), right after the backlog check: the next request sees these texts.
        rows = await asyncio.gather(*[self._student_batcher.submit((snapshot.student, t, deadline)) for t in texts])
        if any(row is None for row in rows):
            raise Overloaded(f"queued longer than {self.config.limits.queue_deadline_s} s before the student ran")
        return np.stack(rows)

    def _refuse_if_backlogged(self, texts: int, deadline: float) -> None:
        """Refuse now (fast 503) only when the student's queue is falling behind: its oldest text has already
        waited more than ``admission_wait_share`` of ``queue_deadline_s`` (a wait that happened, not an estimate),
        or the texts ahead of this request (the running batch, the queue and its own) could not start within that
        share of the time it may wait even at the model's own pace (``ModelTime``: a floor, which time spent
        between batches does not inflate, unlike the queue's wall time per text). Queueing such a request would
        only shed it at its deadline, slowly, and slow the rest. A closed loop offers no more than the queue
        drains, so while the admission limit's texts fit in that share neither fires: it queues (the settings
        show the arithmetic).
        """
        limits, batcher = self.config.limits, self._student_batcher
        share = limits.admission_wait_share
        waited = batcher.oldest_wait
        if waited > share * limits.queue_deadline_s:
            raise Overloaded(f"the oldest text queued for the student has waited {waited:.2f} s: more than "
                             f"{share:g} of the {limits.queue_deadline_s:g} s queue deadline")
        per_text, ahead = self.student_time.per_text, batcher.backlog
        if per_text is None or ahead == 0:
            return
        if (ahead + texts) * per_text > share * (deadline - self.clock()):
            raise Overloaded(f"{ahead} texts queued for the student, at least {ahead * per_text:.2f} s of model time: "
                             f"more than {share:g} of the {limits.queue_deadline_s:g} s queue deadline")

    # -- the teacher ----------------------------------------------------------------------------
    async def _ask_teacher(self, texts: list[str], enforce_budget: bool, shadow: bool = False
                           ) -> tuple[np.ndarray | None, str | None, DegradedReason | None]:
        """Teacher logits, or why not. The breaker answers at once while the teacher is known dead;
        timeouts and errors count against it, gate refusals and cancellations do not."""
        if self.breaker.state == "open":
            return None, None, DegradedReason.UNAVAILABLE
        refusal = self.gate.try_acquire_shadow(len(texts)) if shadow else self.gate.try_acquire(len(texts),
                                                                                                  enforce_budget)
        if refusal is not None:
            return None, None, refusal
        release = self.gate.release_shadow if shadow else self.gate.release
        try:
            if not self.breaker.allow():  # half-open with its probe already out
                return None, None, DegradedReason.UNAVAILABLE
            try:
                logits, version = await asyncio.wait_for(self.teacher(texts), self.config.teacher.timeout_s)
            except TimeoutError:
                self.breaker.record_failure()
                return None, None, DegradedReason.TIMEOUT
            except Exception as exc:  # any failure of the teacher degrades, never fails, the request
                self.breaker.record_failure()
                logger.warning("teacher call failed: %s: %s", type(exc).__name__, exc)
                return None, None, DegradedReason.ERROR
            self.breaker.record_success()
            return np.asarray(logits, dtype=np.float64), version, None
        finally:
            release()

    # -- one request ----------------------------------------------------------------------------
    async def classify_texts(self, texts: list[str], route: Route, started: float | None = None
                             ) -> list[dict[str, Any]]:
        """Answer ``texts``; ``started`` (this router's clock) is when the request arrived, for the
        queue deadline. Raises ``Overloaded`` when shed."""
        snapshot = self.snapshot
        assert snapshot is not None, "no model loaded"
        bundle, policy = snapshot.bundle, snapshot.policy
        deadline = (started if started is not None else self.clock()) + self.config.limits.queue_deadline_s
        if self.clock() > deadline:
            raise Overloaded(f"queued longer than {self.config.limits.queue_deadline_s} s before it started")
        if route is not Route.TEACHER:
            self._refuse_if_backlogged(len(texts), deadline)
        teacher_version, reason = bundle.teacher_version, None
        if route is Route.TEACHER:
            # Forced teacher: the student is not run unless the teacher fails (then it answers, degraded),
            # so "teacher only" costs what the teacher alone costs.
            teacher_logits, version, reason = await self._ask_teacher(texts, enforce_budget=False)
            if teacher_logits is not None:
                probs = softmax(teacher_logits, bundle.manifest.temperatures.teacher)
                return [result(bundle, row, float(np.max(row)), "teacher", None, version or teacher_version)
                        for row in probs]
        logits = await self._student_answer(snapshot, texts, deadline)
        decisions = policy.decide(logits, route)
        for decision in decisions:
            self.metrics.confidence.observe(decision.confidence)
        if route is Route.AUTO:
            self.gate.observe(len(texts))
        deferred = [i for i, d in enumerate(decisions) if d.to_teacher]
        teacher_probs: np.ndarray | None = None
        if deferred and route is Route.AUTO:
            teacher_logits, version, reason = await self._ask_teacher([texts[i] for i in deferred], enforce_budget=True)
            if teacher_logits is not None:
                teacher_probs = softmax(teacher_logits, bundle.manifest.temperatures.teacher)
                teacher_version = version or teacher_version
                self._record([texts[i] for i in deferred], np.stack([decisions[i].probabilities for i in deferred]),
                             teacher_probs, bundle, teacher_version, "fallback", 1.0, policy.threshold,
                             np.array([decisions[i].confidence for i in deferred]))
        if route is Route.AUTO:
            shadowed = self.shadow.pick([i for i, d in enumerate(decisions) if not d.to_teacher])
            if shadowed:
                self._spawn(self._shadow([texts[i] for i in shadowed],
                                         np.stack([decisions[i].probabilities for i in shadowed]), bundle,
                                         np.array([decisions[i].confidence for i in shadowed]), policy.threshold,
                                         self.shadow.share))
        results = []
        teacher_row = {index: row for row, index in enumerate(deferred)}
        for i, decision in enumerate(decisions):
            if i in teacher_row and teacher_probs is not None:
                probs = teacher_probs[teacher_row[i]]
                results.append(result(bundle, probs, float(np.max(probs)), "teacher", None, teacher_version))
            else:
                why = (reason.value if reason else None) if i in teacher_row else None
                results.append(result(bundle, decision.probabilities, decision.confidence, "student",
                                      why, teacher_version, degraded=i in teacher_row))
        return results

    # -- the loop back to distillation -----------------------------------------------------------
    def _record(self, texts: list[str], student_probs: np.ndarray, teacher_probs: np.ndarray, bundle: Bundle,
                teacher_version: str, reason: Literal["fallback", "shadow"], sampling_probability: float,
                threshold: float, confidences: np.ndarray) -> None:
        """Hand the teacher's answers to the queue writer, each with the chance it had of being asked;
        never blocks (a full buffer is counted). The live estimate's window gets every answer."""
        disagreements = int((student_probs.argmax(-1) != teacher_probs.argmax(-1)).sum())
        if disagreements:
            self.metrics.disagreements.inc(disagreements, tags={"source": reason})
        self.evidence.add(np.full(len(texts), 1.0 / sampling_probability), confidences, threshold,
                          student_probs.argmax(-1), teacher_probs.argmax(-1), bundle.version, teacher_version)
        writer = self.writer
        if writer is None:
            return
        for record in teacher_answer_records(texts, student_probs, teacher_probs, bundle.version, teacher_version,
                                             reason, self.config.queue.keep, sampling_probability, threshold,
                                             confidences, agreement_share=self.shadow.share):
            writer.submit(record)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shadow(self, texts: list[str], student_probs: np.ndarray, bundle: Bundle, confidences: np.ndarray,
                      threshold: float, share: float) -> None:
        """Ask the teacher about texts the student already answered; the request has gone.
        Only spare teacher capacity is used (``TeacherGate.try_acquire_shadow``)."""
        teacher_logits, version, _ = await self._ask_teacher(texts, enforce_budget=True, shadow=True)
        self._shadow_outcomes.append((len(texts), 0 if teacher_logits is None else len(texts)))
        if teacher_logits is None:
            return
        picked, taken = (sum(column) for column in zip(*self._shadow_outcomes, strict=True))
        share *= taken / picked  # refusals are taken as independent of the text (they depend on load)
        teacher_probs = softmax(teacher_logits, bundle.manifest.temperatures.teacher)
        agreed = int((teacher_probs.argmax(-1) == student_probs.argmax(-1)).sum())
        self.shadow_sent += len(texts)
        self.shadow_agreed += agreed
        self.metrics.shadowed(len(texts), agreed, self.config.cost)
        self._record(texts, student_probs, teacher_probs, bundle, version or bundle.teacher_version, "shadow", share,
                     threshold, confidences)

    async def feedback(self, texts: list[str], labels: list[int]) -> int:
        """Queue texts with their true labels (``/v1/feedback``), with both models' answers for the live
        accuracy estimate; the teacher is asked outside the auto-traffic budget (feedback is small and
        rare), and a teacher that cannot answer leaves its field empty. Returns the records queued."""
        snapshot = self.snapshot
        assert snapshot is not None, "no model loaded"
        bundle, policy = snapshot.bundle, snapshot.policy
        logits = await self._student_answer(snapshot, texts, self.clock() + self.config.limits.queue_deadline_s)
        decisions = policy.decide(logits, Route.AUTO)
        student_probs = np.stack([d.probabilities for d in decisions])
        confidences = np.array([d.confidence for d in decisions])
        teacher_logits, version, _ = await self._ask_teacher(texts, enforce_budget=False)
        teacher_probs = None if teacher_logits is None else softmax(teacher_logits,
                                                                   bundle.manifest.temperatures.teacher)
        teacher_version = version or bundle.teacher_version
        records = feedback_records(texts, labels, student_probs, teacher_probs, bundle.version, teacher_version,
                                   policy.threshold, confidences)
        deferred = confidences < policy.threshold
        cascade = student_probs.argmax(-1) if teacher_probs is None else np.where(
            deferred, teacher_probs.argmax(-1), student_probs.argmax(-1))
        self.evidence.add_labelled(labels, cascade, bundle.version, teacher_version, student_probs.argmax(-1))
        writer = self.writer
        if writer is None:
            raise RuntimeError("no distillation queue configured")
        return sum(writer.submit(record) for record in records)
