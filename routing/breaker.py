"""A circuit breaker for calls to the teacher: a dead teacher should cost a deferred text milliseconds.

Without it every deferred text waits out the full teacher timeout before it degrades. The breaker
opens after ``failure_threshold`` consecutive failures (errors or timeouts); while open, ``allow()``
says no at once and the caller answers degraded. After ``cooldown_s`` one probe call is let through
(half-open): its success closes the breaker, its failure opens it for another cool-down.

A decision with no I/O and no Ray, so it is unit-tested with a fake clock. Written here rather than
taken from aiobreaker / purgatory / pybreaker: those wrap the call itself (decorators, context
managers, their own exception policy), while the gateway and the remote teacher client need to ask
"may I call?" and report the outcome separately (a timeout is an ``asyncio.wait_for`` around a
Serve handle, a refusal by the concurrency gate is no outcome at all). Not thread-safe by design:
each instance is used from one event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# Gauge values for metrics: a dashboard plots 0 (closed), 1 (half open), 2 (open).
BREAKER_STATE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class CircuitBreaker:
    """Closed -> open after N consecutive failures -> half-open after a cool-down -> closed on a success.

    In half-open one probe is in flight at a time; a probe whose outcome is never reported (its
    caller was cancelled) stops blocking after another cool-down, so the breaker cannot stick.
    """

    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_at: float | None = None
        self.opened = 0  # how many times it has opened (for logs and tests)

    def configure(self, failure_threshold: int, cooldown_s: float) -> None:
        """Live reconfiguration; the current state is kept."""
        self.failure_threshold, self.cooldown_s = failure_threshold, cooldown_s

    @property
    def state(self) -> BreakerState:
        """The state as of now: an open breaker whose cool-down has passed reads as half-open."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self._state = BreakerState.HALF_OPEN
            self._probe_at = None
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures so far (reset by a success)."""
        return self._failures

    def allow(self) -> bool:
        """May a call go to the teacher now? In half-open, yes for one probe at a time."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        now = self._clock()
        if self._probe_at is None or now - self._probe_at >= self.cooldown_s:
            self._probe_at = now
            return True
        return False

    def record_success(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probe_at = None

    def record_failure(self) -> None:
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            if self._state is not BreakerState.OPEN:
                self.opened += 1
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._probe_at = None
