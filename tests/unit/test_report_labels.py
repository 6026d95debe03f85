"""The report's per-label lines and error overlap: a rare label no model answers is a FAIL, not an average."""

from __future__ import annotations

import numpy as np

from distill.evaluate import error_overlap, format_report, per_label

NAMES = ("common", "other", "rare")


def _evaluation(per_label_entries: dict, overlap: dict | None = None) -> dict:
    entry = {"accuracy": 0.9, "ci_low": 0.88, "ci_high": 0.92}
    return {"version": "v1", "test_texts": 100, "tfidf_logreg_accuracy": 0.8,
            "teacher": entry | {"gain_over_tfidf": 0.1}, "student_int8": entry | {"ratio_to_teacher": 1.0},
            "cascade": entry | {"accuracy_minus_teacher": 0.0, "accuracy_minus_teacher_ci": [-0.01, 0.01],
                                "threshold": 0.9, "teacher_share": 0.1, "agreement_with_teacher": 0.98},
            "latency_batch1_threads": 2, "student_latency": {"p50_ms": 1.0, "p99_ms": 2.0},
            "teacher_runtimes": {"onnx": {"latency": {"p50_ms": 10.0, "p99_ms": 20.0}, "speedup_p50": 10.0},
                                 "torch": {"latency": {"p50_ms": 30.0, "p99_ms": 40.0}, "speedup_p50": 30.0}},
            "teacher_latency": {"p50_ms": 10.0, "p99_ms": 20.0}, "speedup_p50": 10.0,
            "per_label": per_label_entries, "error_overlap": overlap}


def test_per_label_recall_and_macro_f1() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    never_rare = np.array([0, 0, 0, 1, 1, 1, 1, 0, 1])
    out = per_label(never_rare, labels, NAMES)
    assert out["recall"]["common"] == {"recall": 0.75, "texts": 4}
    assert out["recall"]["rare"] == {"recall": 0.0, "texts": 2}
    perfect = per_label(labels, labels, NAMES)
    assert perfect["macro_f1"] == 1.0 and out["macro_f1"] < 0.6


def _labels_report(rare_recall: float, tfidf_rare: float, model_f1: float) -> str:
    def entry(rare: float, f1: float) -> dict:
        return {"recall": {"common": {"recall": 0.9, "texts": 50}, "other": {"recall": 0.8, "texts": 40},
                           "rare": {"recall": rare, "texts": 10}}, "macro_f1": f1}

    labels = {"tfidf": entry(tfidf_rare, 0.7), "teacher": entry(rare_recall, model_f1),
              "student_int8": entry(rare_recall, model_f1), "cascade": entry(rare_recall, model_f1)}
    return format_report({"evaluation": _evaluation(labels)})


def _row(report: str, start: str) -> str:
    return next(line for line in report.splitlines() if line.startswith(start))


def test_a_label_never_answered_or_far_below_tfidf_is_a_fail_line() -> None:
    assert "FAIL" in _row(_labels_report(0.0, 0.0, 0.8), "recall 'rare'")  # 0 is a FAIL even where TF-IDF gets 0
    assert "FAIL" in _row(_labels_report(0.4, 0.8, 0.8), "recall 'rare'")  # 40 points under TF-IDF
    assert "PASS" in _row(_labels_report(0.7, 0.8, 0.8), "recall 'rare'")
    assert "FAIL" in _row(_labels_report(0.7, 0.8, 0.6), "macro-F1")  # under TF-IDF's 0.7
    assert "PASS" in _row(_labels_report(0.7, 0.8, 0.8), "macro-F1")


def test_both_teacher_runtimes_get_their_own_speed_up_line() -> None:
    report = _labels_report(0.7, 0.8, 0.8)
    assert "PASS (>= 8x)" in _row(report, "speed-up vs ONNX Runtime fp32 teacher")
    assert "PASS (>= 20x)" in _row(report, "speed-up vs PyTorch fp32 teacher")


def test_error_overlap_counts_what_the_cascade_can_fix() -> None:
    labels = np.array([0, 0, 1, 1, 1, 0])
    teacher = np.array([0, 1, 1, 1, 0, 0])  # wrong on 1 and 4
    student = np.array([1, 1, 0, 1, 1, 0])  # wrong on 0, 1, 2; copies the teacher's error on 1
    deferred = np.array([True, False, False, False, True, False])
    assert error_overlap(student, teacher, labels, deferred) == {
        "teacher_errors": 2, "copied_teacher_errors": 1, "student_errors": 3,
        "student_errors_teacher_right": 2, "of_those_deferred": 1,
        "deferred_where_student_right_teacher_wrong": 1,
    }
