"""The cascade's live agreement with the teacher, estimated from recorded traffic (numpy only, no Ray).

Every queued record carries the probability it had of being recorded: 1.0 for a deferred text
(the teacher answered it anyway), the shadow share for a student-served text the shadow sampler
picked. Weighting each record by the inverse of that probability (a Hajek, i.e. ratio,
inverse-propensity estimate) makes the records stand for all traffic, so the mean of "the cascade's
answer equals the teacher's" over them estimates the live agreement without bias, although the
queue holds far more deferred texts than student-served ones.

The interval: the linearised (sandwich) variance of the weighted mean gives an effective sample
size n_eff = p(1 - p) / var, and the Wilson score interval on (p, n_eff) keeps its coverage near
0 and 1, where agreement lives. Deferred texts add no variance (their answer is the teacher's),
so the width comes from the shadow sample alone. Texts the teacher refused (degraded) are not
recorded: the estimate is of the cascade when the teacher answers.

Because every record also carries the student's confidence, the same records answer "what would
agreement and teacher share be at another threshold", which ``cascade calibrate --from-queue``
uses. Records of another teacher or student version are not mixed in: they answer another question.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm

from records.queue import AnswerRecord


@dataclass(frozen=True)
class Interval:
    """A proportion with its two-sided interval and the evidence behind it."""

    value: float
    low: float
    high: float
    records: int
    effective_n: float
    level: float = 0.95

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Evidence:
    """Recorded teacher answers as arrays: one row per record, weight = 1 / sampling probability."""

    weights: np.ndarray
    confidence: np.ndarray
    threshold: np.ndarray
    student_label: np.ndarray
    teacher_label: np.ndarray
    teacher_version: str | None = None
    student_version: str | None = None

    def __len__(self) -> int:
        return len(self.weights)


def wilson(p: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion observed on ``n`` (possibly effective, non-integer) trials."""
    if n <= 0:
        return 0.0, 1.0
    z = float(norm.ppf(0.5 + level / 2))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def weighted_proportion(y: np.ndarray, weights: np.ndarray, level: float = 0.95) -> Interval:
    """Hajek weighted mean of 0/1 outcomes with a Wilson interval on its effective sample size."""
    y, weights = np.asarray(y, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    if len(y) == 0:
        return Interval(float("nan"), 0.0, 1.0, 0, 0.0, level)
    total = weights.sum()
    p = float((weights * y).sum() / total)
    variance = float(((weights * (y - p)) ** 2).sum() / total**2)
    kish = float(total**2 / (weights**2).sum())
    effective_n = p * (1 - p) / variance if variance > 0 else kish
    low, high = wilson(p, effective_n, level)
    return Interval(p, low, high, len(y), effective_n, level)


def evidence_from_records(records: Iterable[AnswerRecord], teacher_version: str | None = None,
                          student_version: str | None = None) -> Evidence:
    """Shadow and fallback records of one teacher and one student version (default: the newest record's)."""
    usable = [r for r in records if r.reason in ("shadow", "fallback") and r.teacher_probs is not None
              and r.confidence is not None and r.threshold is not None]
    if usable:
        newest = max(usable, key=lambda r: r.time)
        teacher_version = teacher_version or newest.teacher_version
        student_version = student_version or newest.student_version
    chosen = [r for r in usable if r.teacher_version == teacher_version and r.student_version == student_version]
    return Evidence(
        weights=np.array([1.0 / r.sampling_probability for r in chosen]),
        confidence=np.array([r.confidence for r in chosen], dtype=np.float64),
        threshold=np.array([r.threshold for r in chosen], dtype=np.float64),
        student_label=np.array([int(np.argmax(r.student_probs)) for r in chosen], dtype=np.int64),
        teacher_label=np.array([int(np.argmax(r.teacher_probs)) for r in chosen], dtype=np.int64),
        teacher_version=teacher_version, student_version=student_version,
    )


def live_agreement(evidence: Evidence, level: float = 0.95) -> Interval:
    """Agreement of what the cascade answered (teacher below the live threshold, else student) with the teacher."""
    deferred = evidence.confidence < evidence.threshold
    agree = np.where(deferred, True, evidence.student_label == evidence.teacher_label)
    return weighted_proportion(agree, evidence.weights, level)


@dataclass(frozen=True)
class CurvePoint:
    """The cascade at one threshold, estimated from the records."""

    threshold: float
    teacher_share: float
    agreement: Interval


def agreement_curve(evidence: Evidence, thresholds: Iterable[float] | None = None,
                    level: float = 0.95) -> list[CurvePoint]:
    """Agreement and teacher share if every text below each threshold went to the teacher.

    Valid at any threshold because each record's inclusion probability is known, whatever the
    threshold was when it was recorded. Default thresholds: each observed confidence (just above it).
    """
    if thresholds is None:
        observed = np.unique(evidence.confidence)
        if len(observed) > 2000:  # a fine grid is enough, and keeps the sweep linear in the records
            observed = np.unique(np.quantile(evidence.confidence, np.linspace(0, 1, 2001)))
        thresholds = np.concatenate([[0.0], np.nextafter(observed, np.inf)])
    return _curve(evidence, np.asarray(list(thresholds), dtype=np.float64), level)


def _curve(evidence: Evidence, thresholds: np.ndarray, level: float) -> list[CurvePoint]:
    """``weighted_proportion`` at every threshold at once: sorted by confidence, the texts a threshold defers
    are a prefix, so every sum it needs is a cumulative sum (linear in records plus thresholds, not their
    product: the controller runs this on each replica's beat)."""
    order = np.argsort(evidence.confidence, kind="stable")
    confidence = evidence.confidence[order]
    w = np.asarray(evidence.weights, dtype=np.float64)[order]
    agree = (evidence.student_label == evidence.teacher_label)[order].astype(np.float64)
    prefix = np.searchsorted(confidence, thresholds, side="left")  # texts with confidence < threshold

    def upto(values: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(values)])[prefix]

    total, total_sq = w.sum(), (w * w).sum()
    deferred_w, deferred_sq = upto(w), upto(w * w)
    agreed_w, agreed_sq = (w * agree).sum() - upto(w * agree), (w * w * agree).sum() - upto(w * w * agree)
    p = (deferred_w + agreed_w) / total  # y is 1 on the deferred prefix, else whether the student agreed
    y_sq = deferred_sq + agreed_sq  # sum of w^2 y (y is 0 or 1)
    variance = np.maximum(y_sq - 2 * p * y_sq + p * p * total_sq, 0.0) / total**2
    with np.errstate(divide="ignore", invalid="ignore"):
        effective_n = np.where(variance > 0, p * (1 - p) / variance, total**2 / total_sq)
    low, high = _wilson_many(p, effective_n, level)
    return [CurvePoint(float(t), float(share), Interval(float(pi), float(lo), float(hi), len(w), float(n), level))
            for t, share, pi, lo, hi, n in zip(thresholds, deferred_w / total, p, low, high, effective_n, strict=True)]


def _wilson_many(p: np.ndarray, n: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """``wilson`` over arrays (one quantile lookup for them all)."""
    z = float(norm.ppf(0.5 + level / 2))
    safe_n = np.where(n > 0, n, 1.0)
    centre = (p + z * z / (2 * safe_n)) / (1 + z * z / safe_n)
    half = z / (1 + z * z / safe_n) * np.sqrt(np.maximum(p * (1 - p), 0.0) / safe_n + z * z / (4 * safe_n**2))
    low, high = np.maximum(0.0, centre - half), np.minimum(1.0, centre + half)
    return np.where(n > 0, low, 0.0), np.where(n > 0, high, 1.0)


def threshold_for_target(points: list[CurvePoint], target: float) -> CurvePoint | None:
    """The smallest teacher share whose agreement interval's LOWER bound reaches ``target`` (None: none does)."""
    for point in sorted(points, key=lambda p: (p.teacher_share, p.threshold)):
        if point.agreement.low >= target:
            return point
    return None


def live_accuracy(records: Iterable[AnswerRecord], level: float = 0.95) -> dict[str, Interval] | None:
    """Accuracy on texts with true labels (/v1/feedback) of the cascade, the student and the teacher.

    Unweighted: it stands for traffic only as far as the labelled texts are a random sample of it.
    Texts the teacher did not answer count for the student only.
    """
    labelled = [r for r in records if r.label is not None and r.confidence is not None and r.threshold is not None]
    if not labelled:
        return None
    label = np.array([r.label for r in labelled])
    student = np.array([int(np.argmax(r.student_probs)) for r in labelled])
    answered = np.array([r.teacher_probs is not None for r in labelled])
    teacher = np.array([int(np.argmax(r.teacher_probs)) if r.teacher_probs is not None else -1 for r in labelled])
    deferred = np.array([r.confidence < r.threshold for r in labelled])
    cascade = np.where(deferred & answered, teacher, student)
    ones = np.ones(len(labelled))
    result = {"cascade": weighted_proportion(cascade == label, ones, level),
              "student": weighted_proportion(student == label, ones, level)}
    if answered.any():
        result["teacher"] = weighted_proportion(teacher[answered] == label[answered], ones[answered], level)
    return result


def summary(records: list[AnswerRecord], level: float = 0.95) -> dict[str, object]:
    """What `cascade queue stats` prints: the live agreement and accuracy estimates, with what they rest on."""
    evidence = evidence_from_records(records)
    reasons = Counter(r.reason for r in records)
    out: dict[str, object] = {"records": dict(reasons), "teacher_version": evidence.teacher_version,
                              "student_version": evidence.student_version, "records_used": len(evidence)}
    out["live_agreement"] = live_agreement(evidence, level).as_dict() if len(evidence) else None
    accuracy = live_accuracy(records, level)
    out["live_accuracy"] = None if accuracy is None else {k: v.as_dict() for k, v in accuracy.items()}
    return out


class LiveEvidence:
    """The gateway's recent teacher answers in memory, for the live gauges.

    Requests append (cheap, under a lock); the follow thread computes the estimate on its beat, so
    the request path never pays for it. Bounded: the newest ``capacity`` answers of the newest
    teacher and student versions (a swap starts the window again, since it answers another question).
    """

    def __init__(self, capacity: int = 20_000) -> None:
        self._lock = threading.Lock()
        self._answers: deque[tuple[float, float, float, int, int]] = deque(maxlen=capacity)
        self._labelled: deque[tuple[int, int, int]] = deque(maxlen=capacity)
        self._versions: tuple[str, str] | None = None

    def _versions_seen(self, student_version: str, teacher_version: str) -> None:
        if self._versions != (student_version, teacher_version):
            self._answers.clear()
            self._labelled.clear()
            self._versions = (student_version, teacher_version)

    def add(self, weights: np.ndarray, confidences: np.ndarray, threshold: float, student_labels: np.ndarray,
            teacher_labels: np.ndarray, student_version: str, teacher_version: str) -> None:
        with self._lock:
            self._versions_seen(student_version, teacher_version)
            self._answers.extend(zip(weights.tolist(), confidences.tolist(), [threshold] * len(weights),
                                     student_labels.tolist(), teacher_labels.tolist(), strict=True))

    def add_labelled(self, labels: list[int], cascade_labels: np.ndarray, student_version: str,
                     teacher_version: str, student_labels: np.ndarray) -> None:
        with self._lock:
            self._versions_seen(student_version, teacher_version)
            self._labelled.extend(zip(labels, cascade_labels.tolist(), student_labels.tolist(), strict=True))

    def evidence(self) -> Evidence | None:
        """The recent teacher answers as arrays (None: none yet), for the estimate and the threshold controller."""
        with self._lock:
            answers = list(self._answers)
            versions = self._versions
        if not answers:
            return None
        w, c, t, s, k = (np.array(column) for column in zip(*answers, strict=True))
        student_version, teacher_version = versions if versions else (None, None)
        return Evidence(w, c, t, s.astype(np.int64), k.astype(np.int64), teacher_version, student_version)

    def estimate(self, level: float = 0.95) -> tuple[Interval | None, Interval | None]:
        """(live agreement with the teacher, live accuracy on labelled texts); None where there is no evidence."""
        evidence = self.evidence()
        with self._lock:
            labelled = list(self._labelled)
        agreement = accuracy = None
        if evidence is not None:
            agreement = live_agreement(evidence, level)
        if labelled:
            label, cascade, _ = (np.array(column) for column in zip(*labelled, strict=True))
            accuracy = weighted_proportion(cascade == label, np.ones(len(label)), level)
        return agreement, accuracy
