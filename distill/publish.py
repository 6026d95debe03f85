"""The one publish path of a distilled student: how `cascade build` and `cascade distill --from-queue` both end.

Stage a folder inside the registry (``Registry.staging``), write the caller's teacher files, the fp32 student and
its tokenizer, export the student to int8 ONNX (distill/export.py), let the caller judge the int8 candidate
(re-distillation's gate), calibrate on val, publish the folder as a new version, then evaluate it on test and
write its report. Anything that fails or is refused before publishing leaves the registry as it was.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from bundle.registry import CURVE_FILE, STUDENT_FILE, STUDENT_FP32_DIR, TOKENIZER_DIR, Bundle, Registry
from bundle.runtime import StudentRuntime
from distill.config import BuildConfig
from distill.data import Splits
from distill.evaluate import (
    calibration_summary,
    evaluate_bundle,
    operating_curve_png,
    pick_operating_point,
    thin_curve,
    write_report,
)
from distill.export import build_student_onnx
from routing.calibration import fit_temperature
from routing.confidence import ConfidenceMeasure, softmax

CALIBRATION_FILE = "calibration.npz"
EXPORT_CHECK_TEXTS = 256  # val texts the int8 export is compared on (distill/export.py)


@contextmanager
def timed(seconds: dict[str, float] | None, name: str) -> Iterator[None]:
    """Time one build stage: the report keeps where a build's minutes went, so cuts follow measurements.
    ``seconds`` None: nothing is timed or printed (re-distillation keeps no stage times)."""
    started = time.perf_counter()
    yield
    if seconds is not None:
        seconds[name] = round(time.perf_counter() - started, 1)
        tqdm.write(f"stage {name}: {seconds[name]:.1f} s")


def student_logits(runtime: StudentRuntime, texts: list[str], labels: int) -> np.ndarray:
    """The int8 student's logits; an empty list gives an empty ``(0, labels)`` array, not an error."""
    return runtime.logits(texts) if texts else np.zeros((0, labels), dtype=np.float32)


def calibrate_bundle_dir(staging: Path, cfg: BuildConfig, val_student_logits: np.ndarray,
                         val_teacher_logits: np.ndarray, val_labels: np.ndarray,
                         test_student_logits: np.ndarray, test_teacher_logits: np.ndarray,
                         test_labels: np.ndarray) -> dict[str, Any]:
    """Fit temperatures on val, pick the threshold on val, and keep the val logits for `cascade calibrate`."""
    t_student = fit_temperature(val_student_logits, val_labels)
    t_teacher = fit_temperature(val_teacher_logits, val_labels)
    np.savez(staging / CALIBRATION_FILE, student_logits=val_student_logits,
             teacher_logits=val_teacher_logits, labels=val_labels)
    measure = ConfidenceMeasure.MAX_PROB
    chosen, points = pick_operating_point(
        softmax(val_student_logits, t_student), softmax(val_teacher_logits, t_teacher), val_labels, measure,
        target_agreement=cfg.calibration.target_agreement, teacher_share=None, level=cfg.calibration.level,
    )
    operating_curve_png(points, chosen, staging / CURVE_FILE, "Deferral sweep on val")
    return {
        "temperatures": {"student": t_student, "teacher": t_teacher},
        "threshold": chosen.threshold,
        "confidence_measure": measure.value,
        "calibration": {
            "student": calibration_summary(test_student_logits, test_labels, t_student),
            "teacher": calibration_summary(test_teacher_logits, test_labels, t_teacher),
            "fitted_on": "val",
            "ece_measured_on": "test",
            "target": {"agreement_with_teacher": cfg.calibration.target_agreement, "level": cfg.calibration.level},
            "val_operating_point": chosen.as_dict(),
            "val_curve": thin_curve(points),
        },
    }


@dataclass(frozen=True)
class Candidate:
    """The int8 student in its staging folder, before it is a version: what a gate judges."""

    staging: Path
    runtime: StudentRuntime
    quantization: dict[str, Any]
    test_logits: np.ndarray


# Writes the teacher's files into the staging folder; returns manifest metrics of its own (the teacher's ONNX check).
StageTeacher = Callable[[Path], dict[str, Any]]
# Judges the candidate: manifest metrics to add (re-distillation's gate), or None to publish nothing.
Judge = Callable[[Candidate], dict[str, Any] | None]


@dataclass(frozen=True)
class Published:
    """What the publish path made: the new version and the calibration summary its report keeps."""

    bundle: Bundle
    calibration: dict[str, Any]


def stage_student(staging: Path, student: Any, tokenizer: Any, check_texts: list[str], max_length: int,
                  threads: int, test_texts: list[str], n_labels: int, tokenizer_dir: Path | None = None,
                  progress: Callable[[str], None] | None = None,
                  stages: dict[str, float] | None = None) -> Candidate:
    """The fp32 student (where re-distillation starts), its tokenizer (copied from ``tokenizer_dir`` when given,
    so a re-distilled bundle keeps its parent's files byte for byte) and the int8 export, opened as served."""
    student.save_pretrained(str(staging / STUDENT_FP32_DIR), safe_serialization=True)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, staging / TOKENIZER_DIR)
    else:
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
    with timed(stages, "export and int8"):
        quantization = build_student_onnx(student, tokenizer, check_texts, max_length, staging / STUDENT_FILE)
    if progress is not None:
        progress(f"int8 student: {quantization}")
    runtime = StudentRuntime(staging / STUDENT_FILE, staging / TOKENIZER_DIR, max_length, threads)
    return Candidate(staging, runtime, quantization, student_logits(runtime, test_texts, n_labels))


def calibrated_fields(candidate: Candidate, cfg: BuildConfig, splits: Splits, teacher_val: np.ndarray,
                      teacher_test: np.ndarray, n_labels: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest fields from calibration: temperatures, threshold, measure; the report's calibration summary)."""
    val_student = student_logits(candidate.runtime, splits.val.texts, n_labels)
    fields = calibrate_bundle_dir(candidate.staging, cfg, val_student, teacher_val, splits.val.labels,
                                  candidate.test_logits, teacher_test, splits.test.labels)
    return fields, fields.pop("calibration")


def evaluate_and_report(published: Published, cfg: BuildConfig, splits: Splits, teacher_test: np.ndarray,
                        threads: int, started: float, stages: dict[str, float] | None = None) -> dict[str, Any]:
    """Measure the published bundle on test as served and write its report.json (``build_seconds`` counts from
    ``started``; ``stage_seconds`` only when ``stages`` is kept). Returns the report."""
    with timed(stages, "evaluation"):
        evaluation = evaluate_bundle(published.bundle, splits, bootstrap_samples=cfg.evaluation.bootstrap_samples,
                                     latency_runs=cfg.evaluation.latency_runs, threads=threads,
                                     teacher_logits_test=teacher_test)
    report: dict[str, Any] = {"evaluation": evaluation, "calibration": published.calibration,
                              "build_seconds": time.time() - started}
    if stages is not None:
        report["stage_seconds"] = stages
    write_report(published.bundle.path, report)
    return report


def publish_student(registry: Registry, *, student: Any, tokenizer: Any, cfg: BuildConfig, splits: Splits,
                    teacher_val: np.ndarray, teacher_test: np.ndarray, fields: dict[str, Any],
                    stage_teacher: StageTeacher, threads: int, started: float, tokenizer_dir: Path | None = None,
                    judge: Judge | None = None, stages: dict[str, float] | None = None,
                    progress: Callable[[str], None] | None = None) -> Bundle | None:
    """Stage, export to int8, judge, calibrate, publish, evaluate and report one student; None when ``judge``
    refused it (nothing is registered then).

    ``fields`` are the caller's manifest fields (labels, lineage, build settings, its own ``metrics``); the
    quantization check, ``stage_teacher``'s metrics and ``judge``'s are added to ``metrics`` in that order, and
    calibration adds temperatures, threshold and measure. ``teacher_val`` and ``teacher_test`` are the teacher's
    logits on the val and test splits (calibration and evaluation). ``progress`` gets the progress lines (None:
    silent, as `cascade distill --from-queue` must be: its stdout is one JSON result).
    """
    n_labels = len(splits.train.label_names)
    with registry.staging() as staging:
        teacher_metrics = stage_teacher(staging)
        candidate = stage_student(staging, student, tokenizer, splits.val.texts[:EXPORT_CHECK_TEXTS], cfg.max_length,
                                  threads, splits.test.texts, n_labels, tokenizer_dir, progress, stages)
        verdict = judge(candidate) if judge is not None else {}
        if verdict is None:
            return None  # the staging folder goes with the context
        manifest, calibration = calibrated_fields(candidate, cfg, splits, teacher_val, teacher_test, n_labels)
        metrics = fields.get("metrics", {}) | {"quantization": candidate.quantization} | teacher_metrics | verdict
        published = Published(registry.publish(staging, manifest | fields | {"metrics": metrics}), calibration)
    if progress is not None:
        progress(f"published {published.bundle.version}; evaluating on test")
    evaluate_and_report(published, cfg, splits, teacher_test, threads, started, stages)
    return published.bundle
