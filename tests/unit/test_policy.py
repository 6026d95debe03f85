import numpy as np

from routing.confidence import ConfidenceMeasure
from routing.policy import DeferralPolicy, DegradedReason, Route, TeacherGate


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_policy_defers_below_the_threshold_and_respects_forced_routes() -> None:
    logits = np.array([[4.0, -4.0], [0.1, 0.0], [-3.0, 3.0]])
    policy = DeferralPolicy(threshold=0.9, temperature=1.0, measure=ConfidenceMeasure.MAX_PROB)
    assert [d.to_teacher for d in policy.decide(logits)] == [False, True, False]
    assert not any(d.to_teacher for d in policy.decide(logits, Route.STUDENT))
    assert all(d.to_teacher for d in policy.decide(logits, Route.TEACHER))
    hot = DeferralPolicy(threshold=0.9, temperature=10.0)  # a high temperature flattens: everything unsure
    assert all(d.to_teacher for d in hot.decide(logits))


def test_gate_caps_concurrency() -> None:
    gate = TeacherGate(max_concurrency=2, max_share=1.0)
    gate.observe(10)
    assert gate.try_acquire(1) is None and gate.try_acquire(1) is None
    assert gate.try_acquire(1) is DegradedReason.SATURATED
    gate.release()
    assert gate.try_acquire(1) is None


def test_gate_budget_is_a_share_of_recent_traffic_with_a_burst() -> None:
    clock = FakeClock()
    gate = TeacherGate(max_concurrency=100, max_share=0.1, window_s=10, burst=2, clock=clock)
    gate.observe(100)
    granted = 0
    while gate.try_acquire(1) is None:
        granted += 1
    assert granted == 12  # 10% of 100 plus a burst of 2
    assert gate.try_acquire(1) is DegradedReason.BUDGET
    assert gate.try_acquire(1, enforce_budget=False) is None  # forced routes skip the budget
    clock.now = 11.0  # the window slides: old traffic no longer counts
    gate.observe(10)
    assert gate.try_acquire(3) is None
    assert 0 < gate.share() <= 0.3


def test_gate_rate_cap() -> None:
    gate = TeacherGate(max_concurrency=100, max_share=1.0, max_texts_per_s=1.0, window_s=5, burst=0)
    gate.observe(1000)
    assert gate.try_acquire(5) is None
    assert gate.try_acquire(1) is DegradedReason.BUDGET


def test_shadow_uses_only_spare_concurrency_and_never_blocks_a_real_deferral() -> None:
    gate = TeacherGate(max_concurrency=3, max_share=1.0, shadow_max_concurrency=1)
    gate.observe(100)
    assert gate.try_acquire_shadow(1) is None
    assert gate.try_acquire_shadow(1) is DegradedReason.SATURATED  # its own small cap
    # The shadow call in flight does not take a real slot: all three real calls are still granted.
    assert [gate.try_acquire(1) for _ in range(3)] == [None, None, None]
    assert gate.try_acquire(1) is DegradedReason.SATURATED
    gate.release_shadow()
    assert gate.try_acquire_shadow(1) is DegradedReason.SATURATED  # real calls at the cap: no spare
    gate.release()
    gate.release()
    assert gate.try_acquire_shadow(1) is None  # spare again


def test_shadow_uses_only_budget_that_real_deferrals_left() -> None:
    clock = FakeClock()
    gate = TeacherGate(max_concurrency=100, max_share=0.1, window_s=10, burst=2, clock=clock,
                       shadow_max_concurrency=100)
    gate.observe(100)
    shadow_granted = 0
    while gate.try_acquire_shadow(1) is None:
        shadow_granted += 1
    assert shadow_granted == 10  # the share with no burst
    real_granted = 0
    while gate.try_acquire(1) is None:
        real_granted += 1
    assert real_granted == 12  # shadow spending took nothing from the real budget
    assert gate.try_acquire_shadow(1) is DegradedReason.BUDGET  # real deferrals used it up


def test_shadow_calls_get_no_budget_that_real_deferrals_spent() -> None:
    gate = TeacherGate(max_concurrency=100, max_share=0.1, window_s=10, burst=2, shadow_max_concurrency=100)
    gate.observe(100)
    granted = 0
    while gate.try_acquire(1) is None:
        granted += 1
    assert granted == 12  # the share and the burst, all spent by real deferrals
    assert gate.try_acquire_shadow(1) is DegradedReason.BUDGET


