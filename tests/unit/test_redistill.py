"""Re-distillation from the queue on the tiny bundle: the gate decides, and a failed gate changes nothing."""

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
from distill.redistill import RedistillConfig, gate_target, redistill, split_records, target_logits
from records.queue import AnswerRecord, Leased, SqliteQueue, teacher_answer_records
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


def record(reason: str, label: int | None = None, teacher: list[float] | None = (0.2, 0.8),
           teacher_version: str = "t", text: str = "x", probability: float = 1.0) -> AnswerRecord:
    return AnswerRecord(text=text, student_probs=[0.6, 0.4], teacher_probs=None if teacher is None else
                              list(teacher), student_version="s", teacher_version=teacher_version, reason=reason,
                              label=label, sampling_probability=probability)


def test_a_true_label_outranks_the_teachers_answer() -> None:
    labelled = target_logits(record("feedback", label=0), 2, 1.5, 1.0, 0.05)
    assert labelled is not None and labelled.argmax() == 0  # the teacher said 1
    assert gate_target(record("feedback", label=0)) == 0 and gate_target(record("shadow")) == 1
    assert target_logits(record("shadow"), 2, 1.5, 1.0, 0.05).argmax() == 1
    assert target_logits(record("feedback", label=None, teacher=None), 2, 1.5, 1.0, 0.05) is None


def test_the_held_out_slice_is_a_uniform_sample_of_traffic_and_slices_are_disjoint() -> None:
    """Shadow records (share 0.25) and fallback records (all deferred texts) stand for traffic in different
    proportions; the held-out slice must take the same share of each kind of text, and nothing else."""
    rng = np.random.default_rng(0)
    texts = [f"text {k}" for k in range(8000)]
    deferred = rng.random(len(texts)) < 0.2
    records = [record("fallback", text=text) if is_deferred else record("shadow", text=text, probability=0.25)
               for text, is_deferred in zip(texts, deferred, strict=True)
               if is_deferred or rng.random() < 0.25]
    records += [record("shadow", teacher_version="old", text=f"old {k}", probability=0.25) for k in range(100)]
    records += [record("feedback", label=1, text=texts[k]) for k in range(300)]  # true labels for some texts
    leased = [Leased(token=r.id, record=r) for r in records]
    holdout, select, learn = split_records(leased, "t", 0.3, 0.15)
    assert all(item.record.reason in ("shadow", "fallback") and item.record.teacher_version == "t" for item in holdout)
    # Every text has the same chance, 0.3 * 0.25 = 7.5%, so the slice has the traffic's share of deferred texts.
    held_deferred = sum(item.record.reason == "fallback" for item in holdout)
    assert abs(len(holdout) / len(texts) - 0.075) < 0.015
    assert abs(held_deferred / len(holdout) - deferred.mean()) < 0.05  # shadow records alone would give 0
    ids = [{item.token for item in part} for part in (holdout, select, learn)]
    assert sum(map(len, ids)) == len(set().union(*ids))
    held_texts = {item.record.text for item in holdout}
    assert not held_texts & {item.record.text for item in select + learn}  # no held-out text is learnt
    left_out = len(records) - sum(map(len, ids))
    assert 0 < left_out == sum(item.record.text in held_texts for item in leased) - len(holdout)
    assert 0.1 < len(select) / (len(select) + len(learn)) < 0.2
    again, _, _ = split_records(leased, "t", 0.3, 0.15)
    assert [item.token for item in again] == [item.token for item in holdout]  # stable by id
