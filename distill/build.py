"""`cascade build`: teacher fine-tuning, distillation, int8 export, calibration, evaluation, bundle.

Resumable: the fine-tuned teacher is kept under ``$CASCADE_HOME/work/<preset>/teacher`` and reused
by a later build with the same settings.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bundle.registry import (
    CURVE_FILE,
    STUDENT_FILE,
    STUDENT_FP32_DIR,
    TEACHER_DIR,
    TOKENIZER_DIR,
    Bundle,
    Registry,
)
from bundle.runtime import StudentRuntime
from distill import train
from distill.config import BuildConfig
from distill.data import LABELS, Splits, load_movie_snippets, stratified_split
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


def default_splits(cfg: BuildConfig) -> Splits:
    """The movie-snippet split, cut down for tiny builds (stratification kept by taking a prefix of each)."""
    splits = stratified_split(load_movie_snippets())
    if cfg.train_limit is None and cfg.eval_limit is None:
        return splits

    def head(data, limit):
        if limit is None or limit >= len(data):
            return data
        index = np.random.default_rng(cfg.seed).permutation(len(data))[:limit]
        return data.subset(np.sort(index))

    return Splits(head(splits.train, cfg.train_limit), head(splits.val, cfg.eval_limit),
                  head(splits.test, cfg.eval_limit))


def _teacher_key(cfg: BuildConfig) -> dict[str, Any]:
    """What decides the teacher's weights; a cached teacher is reused only when all of it matches."""
    return {"recipe": "length-bucketed batches"} | {
        k: getattr(cfg, k) for k in ("max_length", "train_limit", "teacher_layers", "teacher_epochs", "teacher_lr",
                                     "teacher_batch_size", "seed")}


def fine_tune_teacher(cfg: BuildConfig, splits: Splits, work: Path):
    """Return the fine-tuned teacher, training it only if no matching one is already in ``work``."""
    teacher_dir = work / "teacher"
    done = teacher_dir / "cascade_done.json"
    tokenizer = train.load_tokenizer(train.base_model_dir())
    if done.is_file() and json.loads(done.read_text()).get("settings") == _teacher_key(cfg):
        tqdm.write(f"teacher: reusing {teacher_dir}")
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            str(teacher_dir), local_files_only=True, use_safetensors=True
        ).eval()
        return model, tokenizer, json.loads(done.read_text())["val_accuracy"]
    model = train.new_teacher(LABELS, cfg)
    model, val_accuracy = train.fit(
        model, tokenizer, splits.train, splits.val, epochs=cfg.teacher_epochs, lr=cfg.teacher_lr,
        batch_size=cfg.teacher_batch_size, max_length=cfg.max_length, loss_fn=train.hard_label_loss,
        bucket_by_length=True, seed=cfg.seed, desc="teacher fine-tune",
    )
    shutil.rmtree(teacher_dir, ignore_errors=True)
    model.save_pretrained(str(teacher_dir), safe_serialization=True)
    done.write_text(json.dumps({"settings": _teacher_key(cfg), "val_accuracy": val_accuracy}))
    return model, tokenizer, val_accuracy


def distill_student(cfg: BuildConfig, teacher, tokenizer, splits: Splits, soft_targets: np.ndarray,
                    val_teacher_logits: np.ndarray, train_set=None, desc: str = "student distillation"):
    """Shallow copy of the teacher trained on ``alpha * CE + (1 - alpha) * T^2 * KL`` against its logits.

    Each epoch may add teacher-labelled perturbations of the train texts (``kd_augment``); the epoch
    kept is the one whose val answers agree most with the teacher's, since agreement is what decides
    how much traffic the cascade must defer.
    """
    train_set = train_set or splits.train
    student = train.student_from_teacher(teacher, cfg.student_layers)
    val_teacher_labels = val_teacher_logits.argmax(-1)

    def augmented(_epoch: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
        texts = train.perturb(train_set.texts, rng)
        return texts, train.predict_logits(teacher, tokenizer, texts, cfg.max_length, desc="teacher labels")

    return train.fit(
        student, tokenizer, train_set, splits.val, epochs=cfg.student_epochs, lr=cfg.student_lr,
        batch_size=cfg.student_batch_size, max_length=cfg.max_length,
        loss_fn=train.distillation_loss(cfg.kd_alpha, cfg.kd_temperature), soft_targets=soft_targets,
        extra=augmented if cfg.kd_augment else None,
        score=lambda logits: float((logits.argmax(-1) == val_teacher_labels).mean()), bucket_by_length=True,
        seed=cfg.seed, desc=desc,
    )


def _student_checkpoint(cfg: BuildConfig, teacher, tokenizer, splits: Splits, soft: np.ndarray,
                        val_teacher: np.ndarray, work: Path):
    """The distilled fp32 student, kept in ``work`` so export and quantization can be redone alone."""
    student_dir = work / "student_fp32"
    done = student_dir / "cascade_done.json"
    key = _teacher_key(cfg) | {k: getattr(cfg, k) for k in ("student_layers", "student_epochs", "student_lr",
                                                            "student_batch_size", "kd_alpha", "kd_temperature",
                                                            "kd_augment")}
    if done.is_file() and json.loads(done.read_text()).get("settings") == key:
        from transformers import AutoModelForSequenceClassification

        tqdm.write(f"student: reusing {student_dir}")
        model = AutoModelForSequenceClassification.from_pretrained(
            str(student_dir), local_files_only=True, use_safetensors=True).eval()
        return model, json.loads(done.read_text())["val_agreement"]
    student, val_agreement = distill_student(cfg, teacher, tokenizer, splits, soft, val_teacher)
    shutil.rmtree(student_dir, ignore_errors=True)
    student.save_pretrained(str(student_dir), safe_serialization=True)
    done.write_text(json.dumps({"settings": key, "val_agreement": val_agreement}))
    return student, val_agreement


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
        target_agreement=cfg.target_agreement, teacher_share=None,
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
            "target": {"agreement_with_teacher": cfg.target_agreement},
            "val_operating_point": chosen.as_dict(),
            "val_curve": thin_curve(points),
        },
    }


@contextmanager
def _stage(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Time one build stage: the report keeps where a build's minutes went, so cuts follow measurements."""
    started = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - started, 1)
    tqdm.write(f"stage {name}: {seconds[name]:.1f} s")


def build(cfg: BuildConfig, home: Path, promote: bool = True) -> Bundle:
    """Run the whole pipeline and publish a new registry version (promoted to ``current`` by default)."""
    torch.set_num_threads(cfg.threads)
    started = time.time()
    registry = Registry(home)
    work = home / "work" / cfg.name
    work.mkdir(parents=True, exist_ok=True)
    splits = default_splits(cfg)
    tqdm.write(f"data: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test texts")

    stages: dict[str, float] = {}
    with _stage(stages, "teacher fine-tune"):
        teacher, tokenizer, teacher_val = fine_tune_teacher(cfg, splits, work)
    with _stage(stages, "teacher logits"):
        soft = train.predict_logits(teacher, tokenizer, splits.train.texts, cfg.max_length,
                                    desc="teacher soft labels")
        val_teacher = train.predict_logits(teacher, tokenizer, splits.val.texts, cfg.max_length)
        test_teacher = train.predict_logits(teacher, tokenizer, splits.test.texts, cfg.max_length)
    with _stage(stages, "student distillation"):
        student, student_val_agreement = _student_checkpoint(cfg, teacher, tokenizer, splits, soft, val_teacher,
                                                             work)
    registry.root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=registry.root))
    try:
        teacher.save_pretrained(str(staging / TEACHER_DIR), safe_serialization=True)
        student.save_pretrained(str(staging / STUDENT_FP32_DIR), safe_serialization=True)
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        with _stage(stages, "export and int8"):
            quantization = build_student_onnx(student, tokenizer, splits.val.texts[:256], cfg.max_length,
                                              staging / STUDENT_FILE)
        tqdm.write(f"int8 student: {quantization}")
        runtime = StudentRuntime(staging / STUDENT_FILE, staging / TOKENIZER_DIR, cfg.max_length, cfg.threads)
        val_student = runtime.logits(splits.val.texts)
        test_student = runtime.logits(splits.test.texts)
        fields = calibrate_bundle_dir(staging, cfg, val_student, val_teacher, splits.val.labels,
                                      test_student, test_teacher, splits.test.labels)
        calibration = fields.pop("calibration")
        fields |= {
            "labels": list(LABELS),
            "max_length": cfg.max_length,
            "source_data": {
                "train": {"name": splits.train.name, "texts": len(splits.train),
                          "sha256": splits.train.fingerprint()},
                "val": {"name": splits.val.name, "texts": len(splits.val), "sha256": splits.val.fingerprint()},
                "test": {"name": splits.test.name, "texts": len(splits.test),
                         "sha256": splits.test.fingerprint()},
            },
            "parent_version": registry.current_version(),
            "metrics": {"teacher_val_accuracy": teacher_val, "student_fp32_val_agreement": student_val_agreement,
                        "quantization": quantization},
            "build": cfg.model_dump(),
        }
        bundle = registry.publish(staging, fields)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    tqdm.write(f"published {bundle.version}; evaluating on test")
    with _stage(stages, "evaluation"):
        evaluation = evaluate_bundle(bundle, splits, bootstrap_samples=cfg.bootstrap_samples,
                                     latency_runs=cfg.latency_runs, threads=cfg.threads,
                                     teacher_logits_test=test_teacher)
    write_report(bundle.path, {"evaluation": evaluation, "calibration": calibration,
                               "build_seconds": time.time() - started, "stage_seconds": stages})
    if promote:
        registry.promote(bundle.version)
    return registry.load(bundle.version)
