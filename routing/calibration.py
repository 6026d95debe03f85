"""Temperature scaling, calibration error, and the deferral-threshold sweep (numpy/scipy only).

The build fits temperatures and sweeps thresholds offline; serving only reads the numbers back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import pairwise

import numpy as np
from scipy.optimize import minimize_scalar

from routing.confidence import ConfidenceMeasure, confidence, softmax
from routing.estimate import wilson


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    probs = softmax(logits, temperature)
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The single temperature that minimises NLL on held-out data (Guo et al., 2017)."""
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    return float(np.exp(result.x))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width bins."""
    conf = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in pairwise(edges):
        in_bin = (conf > low) & (conf <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


@dataclass(frozen=True)
class OperatingPoint:
    """Cascade behaviour at one threshold: defer every text whose student confidence is below it."""

    threshold: float
    teacher_share: float
    accuracy: float | None
    agreement_with_teacher: float

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def cascade_answers(student_probs: np.ndarray, teacher_probs: np.ndarray, threshold: float,
                    measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB) -> tuple[np.ndarray, np.ndarray]:
    """Predicted labels of the cascade and the mask of texts sent to the teacher."""
    deferred = confidence(student_probs, measure) < threshold
    answers = np.where(deferred, teacher_probs.argmax(-1), student_probs.argmax(-1))
    return answers, deferred


def sweep(student_probs: np.ndarray, teacher_probs: np.ndarray, labels: np.ndarray | None,
          measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB) -> list[OperatingPoint]:
    """Every distinct operating point: thresholds just above each observed confidence, plus 'never defer'."""
    scores = np.unique(confidence(student_probs, measure))
    thresholds = np.concatenate([[-np.inf], np.nextafter(scores, np.inf)])
    teacher_labels = teacher_probs.argmax(-1)
    points = []
    for threshold in thresholds:
        answers, deferred = cascade_answers(student_probs, teacher_probs, float(threshold), measure)
        points.append(
            OperatingPoint(
                threshold=float(threshold) if np.isfinite(threshold) else 0.0,
                teacher_share=float(deferred.mean()),
                accuracy=None if labels is None else float((answers == labels).mean()),
                agreement_with_teacher=float((answers == teacher_labels).mean()),
            )
        )
    return points


def choose_threshold(points: list[OperatingPoint], *, target_agreement: float | None = None,
                     teacher_share: float | None = None, level: float | None = None,
                     texts: int | None = None) -> OperatingPoint:
    """RouteLLM-style calibration: an explicit teacher share, or the cheapest point meeting an agreement.

    Agreement with the teacher needs no labels, so it is the default target: far less noisy than
    accuracy on a test set of about a thousand texts. With ``level`` the target must hold at the lower
    end of the agreement's Wilson interval on the ``texts`` it was measured on, not at the point
    estimate: the cheapest point whose estimate just reaches the target is the one most likely to have
    been lucky on this sample, and it fell short on new texts about as often as not.
    """
    if (target_agreement is None) == (teacher_share is None):
        raise ValueError("give exactly one of target_agreement or teacher_share")
    if level is not None and not texts:
        raise ValueError("a level needs the number of texts the points were measured on")
    ordered = sorted(points, key=lambda p: (p.teacher_share, p.threshold))
    if teacher_share is not None:
        eligible = [p for p in ordered if p.teacher_share <= teacher_share]
        return eligible[-1] if eligible else ordered[0]

    def holds(point: OperatingPoint) -> bool:
        agreement = point.agreement_with_teacher
        if level is not None:
            agreement = wilson(agreement, texts, level)[0]
        return agreement >= target_agreement

    return next((point for point in ordered if holds(point)), ordered[-1])
