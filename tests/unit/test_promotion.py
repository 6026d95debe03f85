"""The promotion gate's three outcomes on constructed answers (no training), and its false-promotion rate."""

from __future__ import annotations

import numpy as np
import pytest

from routing.promotion import Paired, decide, false_promotion_rate, look_alpha, mcnemar_p


def answers(n: int, old_right: int, new_right: int, both_right: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Targets and two students' answers on ``n`` texts with chosen right/wrong counts (2 labels)."""
    assert both_right <= min(old_right, new_right) and old_right + new_right - both_right <= n
    target = np.random.default_rng(seed).integers(0, 2, n)
    old, new = 1 - target, 1 - target
    old[:old_right] = target[:old_right]
    new[:both_right] = target[:both_right]
    new[old_right : old_right + new_right - both_right] = target[old_right : old_right + new_right - both_right]
    return target, old, new


BASE_SAME = Paired.of(*answers(1000, 900, 900, 880))  # 20 vs 20 discordant: no difference


def test_paired_counts_and_mcnemar() -> None:
    paired = Paired.of(*answers(500, 400, 430, 390))
    assert (paired.n, paired.new_only, paired.old_only) == (500, 40, 10)
    assert paired.difference == pytest.approx(0.06)
    assert mcnemar_p(paired, "greater") < 1e-4 < mcnemar_p(paired, "less")


def test_promote_when_better_on_traffic_and_not_worse_on_the_base_set() -> None:
    decision = decide(Paired.of(*answers(500, 400, 430, 390)), BASE_SAME, margin=0.02)
    assert decision.outcome == "promote", decision.reasons
    assert decision.holdout["new_only"] == 40 and decision.holdout["old_only"] == 10
    assert decision.holdout["p_better"] < decision.alpha


def test_reject_when_worse_on_traffic() -> None:
    decision = decide(Paired.of(*answers(500, 430, 400, 390)), BASE_SAME)
    assert decision.outcome == "reject" and "worse on held-out traffic" in decision.reasons[0]


def test_reject_when_the_base_set_loses_more_than_the_margin() -> None:
    base_worse = Paired.of(*answers(1000, 900, 850, 845))  # 5 vs 55: -5 points
    decision = decide(Paired.of(*answers(500, 400, 430, 390)), base_worse, margin=0.005)
    assert decision.outcome == "reject" and "base test accuracy" in decision.reasons[0]


def test_wait_when_the_evidence_is_too_thin() -> None:
    # One point better by 3 discordant texts to 1: the old point-estimate gate promoted on this.
    decision = decide(Paired.of(*answers(200, 150, 152, 149)), BASE_SAME, margin=0.02)
    assert decision.outcome == "wait" and "not yet better" in decision.reasons[0]
    # Better on traffic, but the base set is too noisy to show non-inferiority at a tight margin.
    noisy_base = Paired.of(*answers(100, 90, 90, 80))
    decision = decide(Paired.of(*answers(500, 400, 430, 390)), noisy_base, margin=0.005)
    assert decision.outcome == "wait" and "non-inferiority" in decision.reasons[-1]


def test_later_looks_spend_less_alpha_and_all_looks_together_at_most_alpha() -> None:
    assert look_alpha(0.05, 2) < look_alpha(0.05, 1) < 0.05
    assert sum(look_alpha(0.05, k) for k in range(1, 100_000)) == pytest.approx(0.05, rel=1e-4)
    borderline = Paired.of(*answers(400, 300, 314, 296))  # 18 vs 4: p ~ 0.002
    assert decide(borderline, BASE_SAME, margin=0.02, look=1).outcome == "promote"
    assert decide(borderline, BASE_SAME, margin=0.02, look=20).outcome == "wait"


def test_false_promotion_rate_with_no_new_information_is_at_most_5_percent() -> None:
    # Two equally good students that disagree often: the hardest case for a point-estimate gate.
    holdout = Paired.of(*answers(2000, 1600, 1600, 1400))  # 200 vs 200 discordant
    measured = false_promotion_rate(holdout, BASE_SAME, margin=0.01, resamples=4000, seed=1)
    assert measured["rate"] <= 0.05
    assert measured["rate"] > 0.005, "the resampling must be able to see promotions at all"
