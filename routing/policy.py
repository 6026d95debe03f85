"""Deferral policy and teacher protection: who answers each text, decided without Ray.

The gateway asks this module three questions: is the student sure enough (``DeferralPolicy``), may the
teacher take this text now (``TeacherGate``: concurrency cap and traffic budget), and what to answer
when the teacher could not (the student's answer, marked degraded with a reason).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from routing.confidence import ConfidenceMeasure, confidence, softmax


class Route(StrEnum):
    AUTO = "auto"
    STUDENT = "student"
    TEACHER = "teacher"


class DegradedReason(StrEnum):
    """Why a text that should have gone to the teacher was answered by the student."""

    TIMEOUT = "teacher_timeout"
    ERROR = "teacher_error"
    SATURATED = "teacher_saturated"
    BUDGET = "teacher_budget"
    UNAVAILABLE = "teacher_unavailable"  # the circuit breaker is open: the teacher failed repeatedly


@dataclass(frozen=True)
class Decision:
    """The student's view of one text and whether the teacher should see it."""

    probabilities: np.ndarray
    confidence: float
    to_teacher: bool


@dataclass(frozen=True)
class DeferralPolicy:
    """Calibrated confidence below ``threshold`` sends a text to the teacher."""

    threshold: float
    temperature: float = 1.0
    measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB

    def decide(self, student_logits: np.ndarray, route: Route = Route.AUTO) -> list[Decision]:
        probabilities = softmax(student_logits, self.temperature)
        scores = confidence(probabilities, self.measure)
        if route is Route.STUDENT:
            wants = np.zeros(len(scores), dtype=bool)
        elif route is Route.TEACHER:
            wants = np.ones(len(scores), dtype=bool)
        else:
            wants = scores < self.threshold
        return [Decision(p, float(s), bool(w)) for p, s, w in zip(probabilities, scores, wants, strict=True)]


class TeacherGate:
    """Caps concurrent teacher calls and the teacher's share of traffic (and optionally its call rate).

    ``burst`` texts may go beyond the share, so a cold replica can still reach the teacher.
    Per replica and in memory: each ingress replica enforces its part of the budget, which needs no
    coordination and keeps the check off the network. Shares are measured over a sliding window.

    Shadow calls use only spare capacity, so they can never turn a real deferral into a degraded
    answer: real deferrals count only real calls and real texts, while a shadow call must fit under
    its own small cap, under the concurrency cap together with the real calls in flight, and within
    the share budget left over by real deferrals (no burst).
    """

    def __init__(self, max_concurrency: int, max_share: float, max_texts_per_s: float | None = None,
                 window_s: float = 10.0, burst: int = 8, clock: Callable[[], float] = time.monotonic,
                 shadow_max_concurrency: int = 1) -> None:
        self.max_concurrency = max_concurrency
        self.max_share = max_share
        self.max_texts_per_s = max_texts_per_s
        self.window_s = window_s
        self.burst = burst
        self.shadow_max_concurrency = shadow_max_concurrency
        self._clock = clock
        self.in_flight = 0
        self.shadow_in_flight = 0
        self._seen: deque[tuple[float, int]] = deque()
        self._sent: deque[tuple[float, int]] = deque()
        self._shadow_sent: deque[tuple[float, int]] = deque()

    def configure(self, max_concurrency: int, max_share: float, max_texts_per_s: float | None,
                  window_s: float, shadow_max_concurrency: int | None = None) -> None:
        self.max_concurrency, self.max_share, self.max_texts_per_s = max_concurrency, max_share, max_texts_per_s
        self.window_s = window_s
        if shadow_max_concurrency is not None:
            self.shadow_max_concurrency = shadow_max_concurrency

    def observe(self, texts: int) -> None:
        """Count texts the gateway answered in ``auto`` (the denominator of the share)."""
        self._seen.append((self._clock(), texts))

    def _total(self, window: deque[tuple[float, int]]) -> int:
        horizon = self._clock() - self.window_s
        while window and window[0][0] < horizon:
            window.popleft()
        return sum(n for _, n in window)

    def share(self) -> float:
        """The teacher's share of auto-routed texts over the window, shadow calls included."""
        seen = self._total(self._seen)
        return (self._total(self._sent) + self._total(self._shadow_sent)) / seen if seen else 0.0

    def try_acquire(self, texts: int, enforce_budget: bool = True) -> DegradedReason | None:
        """Reserve a teacher call for ``texts`` texts, or say why not. Call ``release`` after a grant."""
        if self.in_flight >= self.max_concurrency:
            return DegradedReason.SATURATED
        if enforce_budget:
            seen, sent = self._total(self._seen), self._total(self._sent)
            if sent + texts > self.max_share * seen + self.burst:
                return DegradedReason.BUDGET
            if self.max_texts_per_s is not None and sent + texts > self.max_texts_per_s * self.window_s:
                return DegradedReason.BUDGET
        self.in_flight += 1
        if enforce_budget:  # forced teacher routes (debugging) are outside the auto-traffic budget
            self._sent.append((self._clock(), texts))
        return None

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def try_acquire_shadow(self, texts: int) -> DegradedReason | None:
        """Reserve a shadow call from spare capacity only, or say why not. ``release_shadow`` after a grant."""
        if (self.shadow_in_flight >= self.shadow_max_concurrency
                or self.in_flight + self.shadow_in_flight >= self.max_concurrency):
            return DegradedReason.SATURATED
        seen = self._total(self._seen)
        used = self._total(self._sent) + self._total(self._shadow_sent)
        if used + texts > self.max_share * seen:
            return DegradedReason.BUDGET
        if self.max_texts_per_s is not None and used + texts > self.max_texts_per_s * self.window_s:
            return DegradedReason.BUDGET
        self.shadow_in_flight += 1
        self._shadow_sent.append((self._clock(), texts))
        return None

    def release_shadow(self) -> None:
        self.shadow_in_flight = max(0, self.shadow_in_flight - 1)


class ShadowSampler:
    """Picks a share of student-served texts to also ask the teacher, off the request's path.

    An unbiased sample of what the student keeps: its agreement with the teacher there estimates the
    student's accuracy on its own traffic, and a fall in it is drift.
    """

    def __init__(self, share: float, seed: int | None = None) -> None:
        self.share = share
        self._rng = np.random.default_rng(seed)

    def pick(self, candidates: list[int]) -> list[int]:
        if self.share <= 0 or not candidates:
            return []
        chosen = self._rng.random(len(candidates)) < self.share
        return [index for index, keep in zip(candidates, chosen, strict=True) if keep]
