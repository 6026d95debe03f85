import numpy as np
import pytest

from routing.calibration import (
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    sweep,
)
from routing.confidence import ConfidenceMeasure, confidence, softmax


def _synthetic(temperature: float, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / temperature): that temperature is the true one."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, 2))
    probs = softmax(logits, temperature)
    labels = (rng.random(n) < probs[:, 1]).astype(int)
    return logits, labels


def test_fit_temperature_recovers_the_true_temperature() -> None:
    logits, labels = _synthetic(2.5)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.15)


def test_temperature_scaling_reduces_calibration_error() -> None:
    logits, labels = _synthetic(3.0)
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, fit_temperature(logits, labels)), labels)
    assert after < before / 2


def test_confidence_measures_order_sure_above_unsure() -> None:
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.01, 0.99]])
    for measure in ConfidenceMeasure:
        scores = confidence(probs, measure)
        assert scores[0] < scores[1] < scores[2]


def test_sweep_spans_from_no_deferral_to_full_deferral() -> None:
    rng = np.random.default_rng(1)
    student = softmax(rng.normal(0, 2, (500, 2)))
    teacher = softmax(rng.normal(0, 2, (500, 2)))
    points = sweep(student, teacher, None)
    assert points[0].teacher_share == 0.0 and points[-1].teacher_share == 1.0
    assert points[-1].agreement_with_teacher == 1.0
    shares = [p.teacher_share for p in points]
    assert shares == sorted(shares)


def noisy_student_points(seed: int, texts: int = 1000) -> list:
    """The operating points of a student that is the teacher plus noise, on ``texts`` texts."""
    rng = np.random.default_rng(seed)
    teacher = softmax(rng.normal(0, 3, (texts, 2)))
    noisy = softmax(np.log(teacher) + rng.normal(0, 1.0, (texts, 2)))
    return sweep(noisy, teacher, None)


def test_choose_threshold_picks_the_cheapest_point_meeting_the_target() -> None:
    points = noisy_student_points(2)
    chosen = choose_threshold(points, target_agreement=0.97)
    assert chosen.agreement_with_teacher >= 0.97
    assert all(p.agreement_with_teacher < 0.97 for p in points if p.teacher_share < chosen.teacher_share)
    by_share = choose_threshold(points, teacher_share=0.10)
    assert by_share.teacher_share <= 0.10
    with pytest.raises(ValueError):
        choose_threshold(points)


def test_with_a_level_the_target_must_hold_at_the_interval_s_lower_bound() -> None:
    """On a thousand texts the point estimate's cheapest point is the luckiest one; the lower bound adds the margin."""
    from routing.estimate import wilson

    points = noisy_student_points(3)
    by_point = choose_threshold(points, target_agreement=0.97)
    by_bound = choose_threshold(points, target_agreement=0.97, level=0.95, texts=1000)
    assert by_bound.teacher_share > by_point.teacher_share
    assert wilson(by_bound.agreement_with_teacher, 1000, 0.95)[0] >= 0.97
    assert all(wilson(p.agreement_with_teacher, 1000, 0.95)[0] < 0.97
               for p in points if p.teacher_share < by_bound.teacher_share)
    with pytest.raises(ValueError, match="number of texts"):
        choose_threshold(points, target_agreement=0.97, level=0.95)
