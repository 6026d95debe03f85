"""The inverse-propensity estimate of live agreement against simulated streams whose agreement is known."""

from __future__ import annotations

import numpy as np
import pytest

from records.queue import AnswerRecord, teacher_answer_records
from routing.estimate import (
    agreement_curve,
    evidence_from_records,
    live_accuracy,
    live_agreement,
    threshold_for_target,
    weighted_proportion,
)

THRESHOLD = 0.8


def simulated_stream(rng: np.random.Generator, n: int = 4000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Student probabilities (2 labels) and teacher labels: the surer the student, the likelier it agrees."""
    confidence = rng.uniform(0.5, 1.0, n)
    first = rng.random(n) < 0.5
    student_probs = np.where(first[:, None], np.c_[confidence, 1 - confidence], np.c_[1 - confidence, confidence])
    student_label = student_probs.argmax(-1)
    agree = rng.random(n) < confidence**2  # 0.25..1: a miss is far likelier at low confidence
    teacher_label = np.where(agree, student_label, 1 - student_label)
    return student_probs, teacher_label, confidence


def record_stream(rng: np.random.Generator, student_probs: np.ndarray, teacher_label: np.ndarray,
                  confidence: np.ndarray, shadow_share: float, keep: str = "disagreements",
                  threshold: float = THRESHOLD) -> list[AnswerRecord]:
    """What the gateway keeps: every deferred text (agreements thinned), a shadow share of the rest."""
    teacher_probs = np.eye(2)[teacher_label] * 0.9 + 0.05
    deferred = confidence < threshold
    shadowed = ~deferred & (rng.random(len(confidence)) < shadow_share)
    texts = [f"t{i}" for i in range(len(confidence))]
    records = []
    for mask, reason, probability in ((deferred, "fallback", 1.0), (shadowed, "shadow", shadow_share)):
        index = np.flatnonzero(mask)
        records += teacher_answer_records([texts[i] for i in index], student_probs[index], teacher_probs[index],
                                          "s1", "t1", reason, keep, sampling_probability=probability,
                                          threshold=threshold, confidences=confidence[index],
                                          agreement_share=shadow_share, rng=rng)
    return records


def true_agreement(student_probs: np.ndarray, teacher_label: np.ndarray, confidence: np.ndarray,
                   threshold: float) -> float:
    """Measured directly on every text of the stream: what the estimate must find from the records."""
    cascade = np.where(confidence < threshold, teacher_label, student_probs.argmax(-1))
    return float((cascade == teacher_label).mean())


@pytest.mark.parametrize("keep", ["disagreements", "all"])
def test_the_95_interval_covers_the_known_agreement_about_95_percent_of_the_time(keep: str) -> None:
    rng = np.random.default_rng(16)
    repetitions, covered, errors = 300, 0, []
    for _ in range(repetitions):
        student_probs, teacher_label, confidence = simulated_stream(rng, 1500)
        truth = true_agreement(student_probs, teacher_label, confidence, THRESHOLD)
        estimate = live_agreement(evidence_from_records(record_stream(rng, student_probs, teacher_label, confidence,
                                                                      shadow_share=0.1, keep=keep)))
        covered += estimate.low <= truth <= estimate.high
        errors.append(estimate.value - truth)
    coverage = covered / repetitions
    # 300 repetitions: a binomial standard error of 1.3 points around 95%; 3 of them either side.
    assert 0.91 <= coverage <= 0.99, coverage
    assert abs(np.mean(errors)) < 0.003  # unbiased: the mean error is far below one interval's half width
    assert np.sqrt(np.mean(np.square(errors))) < 0.03


def test_unweighted_records_would_be_biased_which_the_weights_correct() -> None:
    """The queue holds every deferred text but only a tenth of the rest: a plain mean is far off."""
    rng = np.random.default_rng(3)
    student_probs, teacher_label, confidence = simulated_stream(rng, 20_000)
    truth = true_agreement(student_probs, teacher_label, confidence, THRESHOLD)
    evidence = evidence_from_records(record_stream(rng, student_probs, teacher_label, confidence, 0.1, "all"))
    naive = weighted_proportion(np.where(evidence.confidence < THRESHOLD, True,
                                         evidence.student_label == evidence.teacher_label),
                                np.ones(len(evidence)))
    weighted = live_agreement(evidence)
    assert abs(weighted.value - truth) < 0.01
    assert abs(naive.value - truth) > 3 * abs(weighted.value - truth)


def test_the_curve_estimates_other_thresholds_and_calibration_uses_the_lower_bound() -> None:
    rng = np.random.default_rng(5)
    student_probs, teacher_label, confidence = simulated_stream(rng, 20_000)
    evidence = evidence_from_records(record_stream(rng, student_probs, teacher_label, confidence, 0.2, "all"))
    for threshold in (0.6, 0.7, 0.9, 0.95):
        point = agreement_curve(evidence, [threshold])[0]
        assert abs(point.teacher_share - float((confidence < threshold).mean())) < 0.02
        truth = true_agreement(student_probs, teacher_label, confidence, threshold)
        assert abs(point.agreement.value - truth) < 0.015, (threshold, point, truth)
    points = agreement_curve(evidence)
    chosen = threshold_for_target(points, 0.97)
    assert chosen is not None and chosen.agreement.low >= 0.97
    cheaper = [p for p in points if p.teacher_share < chosen.teacher_share]
    assert all(p.agreement.low < 0.97 for p in cheaper)
    assert any(p.agreement.value >= 0.97 for p in cheaper), "the point estimate alone would pick a cheaper threshold"
    assert threshold_for_target(points, 1.01) is None


def test_records_of_another_teacher_version_are_not_mixed_in() -> None:
    base = dict(text="x", student_probs=[0.9, 0.1], student_version="s1", reason="shadow",
                sampling_probability=0.5, threshold=0.8, confidence=0.9)
    records = [AnswerRecord(**base, teacher_probs=[0.9, 0.1], teacher_version="t1", time=1.0),
               AnswerRecord(**base, teacher_probs=[0.1, 0.9], teacher_version="t0", time=0.5)]
    evidence = evidence_from_records(records)
    assert evidence.teacher_version == "t1" and len(evidence) == 1
    assert live_agreement(evidence).value == 1.0
    assert len(evidence_from_records(records, teacher_version="t0")) == 1


def test_old_records_without_the_new_fields_still_load() -> None:
    old = ('{"id": "a", "time": 1.0, "text": "x", "student_probs": [0.4, 0.6], "teacher_probs": [0.9, 0.1], '
           '"student_version": "s", "teacher_version": "t", "reason": "fallback", "disagree": true}')
    record = AnswerRecord.model_validate_json(old)
    assert record.sampling_probability == 1.0 and record.label is None and record.confidence is None
    assert len(evidence_from_records([record])) == 0  # no confidence or threshold: not usable as evidence


def test_live_accuracy_from_labelled_records() -> None:
    def labelled(student: list[float], teacher: list[float] | None, label: int) -> AnswerRecord:
        return AnswerRecord(text="x", student_probs=student, teacher_probs=teacher, student_version="s",
                                  teacher_version="t", reason="feedback", label=label, threshold=0.8,
                                  confidence=max(student))
    records = [labelled([0.9, 0.1], [0.9, 0.1], 0), labelled([0.6, 0.4], [0.2, 0.8], 1),
               labelled([0.95, 0.05], [0.1, 0.9], 1), labelled([0.7, 0.3], None, 0)]
    accuracy = live_accuracy(records)
    assert accuracy is not None
    assert accuracy["student"].value == pytest.approx(2 / 4)
    assert accuracy["cascade"].value == pytest.approx(3 / 4)  # the deferred 0.6 text takes the teacher's right answer
    assert accuracy["teacher"].value == pytest.approx(3 / 3)
    assert accuracy["cascade"].low < 0.75 < accuracy["cascade"].high
