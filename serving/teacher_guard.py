"""The teacher as the cascade may use it: behind a traffic budget, a concurrency gate, a timeout and a breaker.

Ray-free: the teacher is any ``bundle.model.Model`` (the Serve handle's adapter in a replica, a fake in
tests). A teacher that cannot answer degrades a request (the student answers, with the reason); it never
fails it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from bundle.model import Model
from routing.breaker import CircuitBreaker
from routing.policy import DegradedReason, TeacherGate
from serving.settings import GatewayConfig

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class TeacherAnswer:
    """The teacher's logits and the version that gave them, or why there are none."""

    logits: np.ndarray | None
    version: str | None
    refused: DegradedReason | None


class GuardedTeacher:
    """Teacher calls under the gate (budget and concurrency), the circuit breaker and the timeout."""

    def __init__(self, teacher: Model) -> None:
        self.teacher = teacher
        self.gate = TeacherGate(0, 0.0)
        self.breaker = CircuitBreaker()
        self.timeout_s = 1.0

    def configure(self, config: GatewayConfig) -> None:
        teacher = config.teacher
        self.gate.configure(teacher.max_concurrency, teacher.max_share, teacher.max_texts_per_s,
                            teacher.budget_window_s, config.shadow.max_concurrency)
        self.breaker.configure(teacher.breaker_failures, teacher.breaker_cooldown_s)
        self.timeout_s = teacher.timeout_s

    @staticmethod
    def _refused(reason: DegradedReason) -> TeacherAnswer:
        return TeacherAnswer(None, None, reason)

    async def ask(self, texts: list[str], enforce_budget: bool, shadow: bool = False) -> TeacherAnswer:
        """Teacher logits, or why not. The breaker answers at once while the teacher is known dead;
        timeouts and errors count against it, gate refusals and cancellations do not."""
        if self.breaker.state == "open":
            return self._refused(DegradedReason.UNAVAILABLE)
        gate = self.gate
        refusal = gate.try_acquire_shadow(len(texts)) if shadow else gate.try_acquire(len(texts), enforce_budget)
        if refusal is not None:
            return self._refused(refusal)
        try:
            if not self.breaker.allow():  # half-open with its probe already out
                return self._refused(DegradedReason.UNAVAILABLE)
            return await self._call(texts)
        finally:
            (gate.release_shadow if shadow else gate.release)()

    async def _call(self, texts: list[str]) -> TeacherAnswer:
        try:
            logits = await asyncio.wait_for(self.teacher.predict(texts), self.timeout_s)
        except TimeoutError:
            self.breaker.record_failure()
            return self._refused(DegradedReason.TIMEOUT)
        except Exception as exc:  # any failure of the teacher degrades, never fails, the request
            self.breaker.record_failure()
            logger.warning("teacher call failed: %s: %s", type(exc).__name__, exc)
            return self._refused(DegradedReason.ERROR)
        self.breaker.record_success()
        # The version of the teacher's latest answer: it changes only on a teacher swap.
        return TeacherAnswer(np.asarray(logits, dtype=np.float64), self.teacher.version, None)
