from routing.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=5.0, clock=FakeClock())
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # a success in between resets the count
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.opened == 1


def test_half_open_lets_one_probe_through_after_the_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5.0, clock=clock)
    breaker.record_failure()
    clock.now = 4.9
    assert not breaker.allow()
    clock.now = 5.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # a second caller waits for the probe's outcome
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert all(breaker.allow() for _ in range(10))


def test_failed_probe_reopens_for_another_cooldown() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=1.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now = 1.5
    assert breaker.allow()
    breaker.record_failure()  # one failed probe is enough, whatever the threshold
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.now = 2.4
    assert not breaker.allow()
    clock.now = 2.5
    assert breaker.allow()
    assert breaker.opened == 2


def test_a_lost_probe_does_not_stick_the_breaker() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=1.0, clock=clock)
    breaker.record_failure()
    clock.now = 1.0
    assert breaker.allow()  # probe granted, its caller is cancelled and never reports
    clock.now = 1.5
    assert not breaker.allow()
    clock.now = 2.0
    assert breaker.allow()


def test_configure_keeps_state() -> None:
    breaker = CircuitBreaker(failure_threshold=5, cooldown_s=5.0, clock=FakeClock())
    breaker.record_failure()
    breaker.configure(failure_threshold=2, cooldown_s=1.0)
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
