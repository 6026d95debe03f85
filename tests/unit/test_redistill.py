"""Re-distillation from the queue on the tiny bundle: the gate decides, and a failed gate changes nothing."""

from __future__ import annotations

import numpy as np

from distill.redistill import gate_target, split_records, target_logits
from records.queue import AnswerRecord, Leased


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
