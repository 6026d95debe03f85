"""Re-distillation on the tiny bundle: too few records, a refused candidate, and waiting for evidence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bundle.registry import Registry
from bundle.runtime import StudentRuntime, TeacherRuntime
from bundle.teachers import open_teacher, teacher_logits_sync
from distill.build import splits_for
from distill.config import BuildConfig
from distill.data import load_amazon_snippets
from distill.evaluate import teacher_cache_dir
from distill.redistill import RedistillConfig, redistill
from records.queue import SqliteQueue, teacher_answer_records
from routing.confidence import softmax


def fill_queue(home: Path, count: int) -> SqliteQueue:
    """Teacher answers on shifted-domain texts, as the gateway would have recorded them."""
    bundle = Registry(home).load()
    texts = load_amazon_snippets().texts[:count]
    m = bundle.manifest
    teacher = TeacherRuntime(bundle.teacher_dir, bundle.tokenizer_dir, m.max_length)
    student = StudentRuntime(bundle.student_path, bundle.tokenizer_dir, m.max_length)
    teacher_probs = softmax(teacher.logits(texts), m.temperatures.teacher)
    student_probs = softmax(student.logits(texts), m.temperatures.student)
    queue = SqliteQueue(home / "queue.db")
    queue.append(teacher_answer_records(texts, student_probs, teacher_probs, bundle.version, bundle.teacher_version,
                                        "shadow", keep="all"))
    return queue


@pytest.mark.integration  # the tiny bundle (a model build) and a re-distillation
def test_too_few_records_is_a_skip(tiny_home_copy: Path) -> None:
    queue = fill_queue(tiny_home_copy, 5)
    result = redistill(tiny_home_copy, queue, RedistillConfig(min_records=20))
    assert result.status == "skipped" and "5 queued records" in result.message


@pytest.mark.integration  # the tiny bundle (a model build) and a re-distillation
def test_a_failed_gate_registers_nothing_and_releases_the_records(tiny_home_copy: Path) -> None:
    registry = Registry(tiny_home_copy)
    versions, current = registry.versions(), registry.current_version()
    queue = fill_queue(tiny_home_copy, 60)
    # An impossible margin: the new student would have to beat the current one by 100 points on the base set.
    result = redistill(tiny_home_copy, queue, RedistillConfig(epochs=1, max_accuracy_drop=-1.0, min_holdout_records=1))
    assert result.status == "rejected" and "base test accuracy" in result.message
    gate = result.gate
    assert gate["holdout_records"] > 0 and not gate["passed"] and gate["outcome"] == "reject"
    assert gate["holdout"]["records"] == gate["holdout_records"]
    assert {"new_only", "old_only", "p_better", "p_worse"} <= set(gate["holdout"])
    assert 0 <= gate["false_promotion"]["rate"] <= 0.05
    assert gate["checkpoints"] and all("selection_agreement" in c for c in gate["checkpoints"])
    assert registry.versions() == versions and registry.current_version() == current
    assert queue.stats().backlog == 60
    assert not list((tiny_home_copy / "registry").glob(".staging-*"))
    assert len(queue.lease(100, lease_s=60)) == 60  # released at once, not after the lease
    assert np.isfinite(gate["new_test_accuracy"])
    # The base-test agreement with the teacher is the current student's own, measured here from its files.
    bundle = registry.load()
    m = bundle.manifest
    texts = splits_for(BuildConfig.model_validate(m.build)).test.texts
    client = open_teacher(m.teacher, bundle.path, m.labels, max_length=m.max_length)
    teacher = teacher_logits_sync(client, texts, teacher_cache_dir(bundle)).argmax(-1)
    student = StudentRuntime(bundle.student_path, bundle.tokenizer_dir, m.max_length).logits(texts).argmax(-1)
    assert gate["current_test_agreement"] == float((student == teacher).mean())
    assert 0 <= gate["new_test_agreement"] <= 1


@pytest.mark.integration  # the tiny bundle (a model build) and a re-distillation
def test_wait_without_enough_held_out_traffic_or_without_new_evidence(tiny_home_copy: Path) -> None:
    queue = fill_queue(tiny_home_copy, 30)
    result = redistill(tiny_home_copy, queue, RedistillConfig(min_holdout_records=1000))
    assert result.status == "wait" and "held-out shadow records" in result.message
    leased = queue.lease(100, lease_s=60)
    assert len(leased) == 30  # released at once
    queue.release([item.token for item in leased])
    # The gate looked before at 1000 held-out records against this student: 30 records are no new evidence.
    parent = Registry(tiny_home_copy).current_version()
    (tiny_home_copy / "work").mkdir(exist_ok=True)
    (tiny_home_copy / "work" / "gate_state.json").write_text(json.dumps({parent: {"looks": 1, "holdout": 1000}}))
    result = redistill(tiny_home_copy, queue, RedistillConfig(min_holdout_records=1))
    assert result.status == "wait" and "needs new evidence" in result.message
