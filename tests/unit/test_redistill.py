"""Re-distillation from the queue on the tiny bundle: the gate decides, and a failed gate changes nothing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bundle.registry import Registry
from bundle.runtime import StudentRuntime, TeacherRuntime
from distill.data import load_amazon_snippets
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


def test_too_few_records_is_a_skip(tiny_home_copy: Path) -> None:
    queue = fill_queue(tiny_home_copy, 5)
    result = redistill(tiny_home_copy, queue, RedistillConfig(min_records=20))
    assert result.status == "skipped" and "5 queued records" in result.message


def test_a_failed_gate_registers_nothing_and_keeps_the_records(tiny_home_copy: Path) -> None:
    registry = Registry(tiny_home_copy)
    versions, current = registry.versions(), registry.current_version()
    queue = fill_queue(tiny_home_copy, 60)
    # An impossible gate: the new student would have to beat the current one by 100 points.
    result = redistill(tiny_home_copy, queue, RedistillConfig(epochs=1, max_accuracy_drop=-1.0, lease_s=0.5))
    assert result.status == "rejected" and "base test accuracy" in result.message
    assert result.gate["holdout_records"] > 0 and not result.gate["passed"]
    assert registry.versions() == versions and registry.current_version() == current
    assert queue.stats().backlog == 60
    assert not list((tiny_home_copy / "registry").glob(".staging-*"))
    # The lease runs out and the records can be leased again.
    time.sleep(0.6)
    assert len(queue.lease(100, lease_s=60)) == 60
    assert np.isfinite(result.gate["new_test_accuracy"])
