"""The threshold controller on simulated traffic with a known agreement curve (no Ray, no models).

Confidence is uniform on [0.5, 1] and the student agrees with the teacher with probability equal to its
confidence, so the cascade at threshold t agrees with the teacher on A(t) = 2(t - 0.5) + 1 - t^2 of
texts, and the cheapest threshold that holds a target a is t* = 1 - sqrt(1 - a).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from routing.controller import ThresholdController
from routing.estimate import Evidence
from serving.settings import GatewayConfig

TARGET = 0.97
T_STAR = 1 - math.sqrt(1 - TARGET)  # 0.8268
SHADOW = 0.2


def traffic(n: int, threshold: float, rng: np.random.Generator, shadow: float = SHADOW) -> Evidence:
    """What a replica serving at ``threshold`` records: every deferred text, a ``shadow`` share of the rest."""
    confidence = rng.uniform(0.5, 1.0, n)
    agree = rng.random(n) < confidence
    deferred = confidence < threshold
    kept = deferred | (rng.random(n) < shadow)
    weights = np.where(deferred, 1.0, 1.0 / shadow)[kept]
    return Evidence(weights, confidence[kept], np.full(int(kept.sum()), threshold), np.zeros(int(kept.sum()), int),
                    np.where(agree, 0, 1)[kept], "teacher", "student")


def run(controller: ThresholdController, start: float, steps: int, seed: int = 0) -> list[float]:
    """The served threshold over ``steps`` updates, each on fresh traffic served at the current threshold."""
    rng = np.random.default_rng(seed)
    thresholds = [start]
    for _ in range(steps):
        thresholds.append(controller.step(thresholds[-1], traffic(20_000, thresholds[-1], rng)).threshold)
    return thresholds


@pytest.mark.parametrize("start", [0.6, 0.97])
def test_it_settles_on_the_cheapest_threshold_that_holds_the_target(start: float) -> None:
    controller = ThresholdController(TARGET, max_step=0.05)
    thresholds = run(controller, start, 20)
    steps = np.abs(np.diff(thresholds))
    assert steps.max() <= 0.05 + 1e-12  # slow: never more than max_step per update
    settled = thresholds[-5:]
    # Held on the interval's lower bound: at or a little above t*, never below it beyond the grid.
    assert all(T_STAR - 0.005 <= t <= T_STAR + 0.03 for t in settled), (settled, T_STAR)
    true_agreement = [2 * (t - 0.5) + 1 - t * t for t in settled]
    assert min(true_agreement) >= TARGET - 0.001


def test_the_answer_does_not_depend_on_the_threshold_the_traffic_was_served_at() -> None:
    """Inverse-propensity weights make traffic recorded at 0.6 and at 0.9 answer the same question."""
    controller = ThresholdController(TARGET, max_step=1.0)
    rng = np.random.default_rng(1)
    wanted = [controller.step(t, traffic(40_000, t, rng)).wanted for t in (0.6, 0.9)]
    assert abs(wanted[0] - wanted[1]) < 0.02 and all(abs(w - T_STAR) < 0.03 for w in wanted)


def test_too_little_evidence_holds_the_threshold() -> None:
    controller = ThresholdController(TARGET, min_records=500)
    rng = np.random.default_rng(2)
    step = controller.step(0.6, traffic(300, 0.6, rng))
    assert step.threshold == 0.6 and step.wanted is None and "hold" in step.reason
    assert controller.step(0.6, None).threshold == 0.6


def test_it_stays_in_its_bounds() -> None:
    rng = np.random.default_rng(3)
    capped = ThresholdController(TARGET, max_threshold=0.7, max_step=1.0)  # no threshold up to 0.7 holds 97%
    step = capped.step(0.6, traffic(20_000, 0.6, rng))
    assert step.threshold == 0.7 and "upper bound" in step.reason
    floored = ThresholdController(0.80, min_threshold=0.9, max_step=1.0)  # 0.80 holds far lower, but not allowed
    assert floored.step(0.95, traffic(20_000, 0.95, rng)).threshold == pytest.approx(0.9)


def test_settings_refuse_a_controller_that_cannot_work() -> None:
    GatewayConfig.model_validate({"routing": {"target_agreement": 0.97}, "shadow": {"share": 0.05}})
    with pytest.raises(ValidationError, match="not both"):
        GatewayConfig.model_validate({"routing": {"threshold": 0.8, "target_agreement": 0.97}})
    with pytest.raises(ValidationError, match=r"shadow\.share"):
        GatewayConfig.model_validate({"routing": {"target_agreement": 0.97}, "shadow": {"share": 0.0}})
    with pytest.raises(ValidationError, match="above max_threshold"):
        GatewayConfig.model_validate({"routing": {"controller": {"min_threshold": 0.9, "max_threshold": 0.8}}})
