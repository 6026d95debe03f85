"""What a re-distillation learns from its queued records: the training rows, the augmented texts, the base replay,
the epoch choice and when the gate may look (no training)."""

from __future__ import annotations

import numpy as np
import pytest

from distill.redistill import (
    EpochChoice,
    RedistillConfig,
    augmented_texts,
    not_ready_reason,
    replay_indices,
    training_rows,
)
from records.queue import AnswerRecord, Leased

N_LABELS = 2
T_TEACHER = 2.0
SMOOTHING = 0.1


def leased(text: str, reason: str = "shadow", teacher: tuple[float, float] | None = (0.8, 0.2),
           label: int | None = None) -> Leased:
    record = AnswerRecord(text=text, student_probs=[0.6, 0.4], teacher_probs=None if teacher is None
                                else list(teacher), student_version="s1", teacher_version="t1", reason=reason,
                                label=label)
    return Leased(token=record.id, record=record)


def rows(items: list[Leased], sharpen: float = 1.0, label_repeat: int = 1,
         teacher_repeat: int = 1) -> tuple[list[str], np.ndarray]:
    return training_rows(items, N_LABELS, T_TEACHER, sharpen, SMOOTHING, label_repeat, teacher_repeat)


def label_row(label: int) -> np.ndarray:
    probs = np.full(N_LABELS, SMOOTHING / N_LABELS)
    probs[label] += 1 - SMOOTHING
    return np.log(probs) * T_TEACHER


def test_a_text_with_a_true_label_is_learnt_from_its_label_only() -> None:
    """The teacher says label 0 for "a"; a person says 1: only the label's row is kept, wherever it comes."""
    items = [leased("a", teacher=(0.9, 0.1)), leased("b", teacher=(0.3, 0.7)),
             leased("a", reason="feedback", teacher=(0.9, 0.1), label=1)]
    texts, logits = rows(items)
    assert texts == ["b", "a"]
    assert logits[1] == pytest.approx(label_row(1))
    assert logits[1].argmax() == 1
    assert logits[0] == pytest.approx(np.log([0.3, 0.7]) * T_TEACHER)


def test_with_labels_not_learnt_a_labelled_text_is_learnt_from_the_teacher() -> None:
    """label_repeat 0 means labels are not learnt (they still judge the gate), not that the text is dropped."""
    items = [leased("a", teacher=(0.9, 0.1)), leased("a", reason="feedback", teacher=(0.9, 0.1), label=1)]
    texts, logits = rows(items, label_repeat=0)
    assert texts == ["a"]
    assert logits[0].argmax() == 0


def test_teacher_rows_are_the_teachers_probabilities_as_logits_sharpened() -> None:
    texts, logits = rows([leased("a", teacher=(0.75, 0.25))], sharpen=3.0)
    assert texts == ["a"]
    assert logits[0] == pytest.approx(np.log([0.75, 0.25]) * T_TEACHER * 3.0, rel=1e-5)
    # Sharpening keeps the answer and makes it surer: the softmax at the teacher's temperature moves toward 1.
    unsharpened = rows([leased("a", teacher=(0.75, 0.25))])[1][0]
    top = np.exp(logits[0] / T_TEACHER) / np.exp(logits[0] / T_TEACHER).sum()
    assert unsharpened.argmax() == logits[0].argmax() == 0 and top[0] > 0.75


def test_label_repeat_and_teacher_repeat_repeat_rows_by_kind() -> None:
    items = [leased("a"), leased("b", reason="feedback", label=0), leased("c", reason="fallback")]
    texts, logits = rows(items, label_repeat=2, teacher_repeat=3)
    assert texts == ["a"] * 3 + ["b"] * 2 + ["c"] * 3
    assert logits.shape == (8, N_LABELS) and logits.dtype == np.float32
    assert all(row == pytest.approx(label_row(0)) for row in logits[3:5])


def test_a_record_with_neither_teacher_answer_nor_label_is_skipped() -> None:
    texts, logits = rows([leased("a", reason="feedback", teacher=None), leased("b")], teacher_repeat=2)
    assert texts == ["b", "b"] and logits.shape == (2, N_LABELS)


def test_no_rows_is_an_empty_matrix_of_the_right_width() -> None:
    texts, logits = rows([leased("a", reason="feedback", teacher=None)])
    assert texts == [] and logits.shape == (0, N_LABELS)


def is_subsequence(words: list[str], source: list[str]) -> bool:
    remaining = iter(source)
    return all(word in remaining for word in words)


ANSWERED = [
    "the battery lasts two days and charges fast enough for a long weekend trip",
    "arrived broken and the seller never answered any of my three emails about it",
    "short",
]


def test_augmented_texts_are_copies_perturbations_of_each_answered_text() -> None:
    texts = augmented_texts(ANSWERED, 3, np.random.default_rng(0))
    assert len(texts) == 3 * len(ANSWERED)
    for k, text in enumerate(texts):
        source = ANSWERED[k % len(ANSWERED)]  # one perturbed copy of every text per round
        assert text and is_subsequence(text.split(), source.split()), (text, source)
    assert texts[2::3] == ["short"] * 3  # too short to perturb: kept as is
    assert any(text not in ANSWERED for text in texts)  # longer texts really are perturbed


def test_augmented_texts_follow_the_generator() -> None:
    assert augmented_texts(ANSWERED, 2, np.random.default_rng(5)) == augmented_texts(ANSWERED, 2,
                                                                                       np.random.default_rng(5))


def test_no_copies_or_no_answered_texts_give_no_augmented_texts() -> None:
    assert augmented_texts(ANSWERED, 0, np.random.default_rng(0)) == []
    assert augmented_texts([], 4, np.random.default_rng(0)) == []


def test_the_base_replay_is_a_fixed_sorted_subset_or_everything() -> None:
    replay = replay_indices(100, 30, seed=7)
    assert len(replay) == 30 and len(set(replay.tolist())) == 30
    assert list(replay) == sorted(replay) and replay.max() < 100
    assert np.array_equal(replay, replay_indices(100, 30, seed=7))  # every run replays the same rows
    assert not np.array_equal(replay, replay_indices(100, 30, seed=8))
    assert np.array_equal(replay_indices(10, None, seed=7), np.arange(10))
    assert np.array_equal(replay_indices(10, 50, seed=7), np.arange(10))  # more asked than there are: all


def one_hot(answers: list[int]) -> np.ndarray:
    return np.eye(N_LABELS)[answers]


def test_the_epoch_choice_scores_recent_traffic_above_the_base_val_floor_only() -> None:
    """Rows are base val (judged against the teacher) then the selection slice (against its targets)."""
    choice = EpochChoice(val_teacher_labels=np.array([0, 1, 0, 1]), select_labels=np.array([1, 1]), floor=0.75)
    keeps_base = choice(one_hot([0, 1, 0, 1, 1, 0]))  # base val 4/4, recent traffic 1/2
    forgets_base = choice(one_hot([0, 0, 1, 1, 1, 1]))  # base val 2/4 (below the floor), recent 2/2
    assert keeps_base == pytest.approx(0.5)
    assert forgets_base < 0 < keeps_base  # better on recent traffic, but it lost the base domain
    assert choice.checkpoints == [{"base_val_agreement": 1.0, "selection_agreement": 0.5},
                                  {"base_val_agreement": 0.5, "selection_agreement": 1.0}]


def test_without_a_selection_slice_the_epoch_is_chosen_on_base_val() -> None:
    choice = EpochChoice(val_teacher_labels=np.array([0, 1]), select_labels=np.array([], dtype=np.int64), floor=0.0)
    assert choice(one_hot([0, 0])) == pytest.approx(0.5)


def test_the_gate_looks_only_with_enough_held_out_records_and_new_evidence() -> None:
    cfg = RedistillConfig(min_holdout_records=20, min_new_evidence=0.25)
    first = {"looks": 0, "holdout": 0}
    assert "19 held-out shadow records (< 20)" in (not_ready_reason(cfg, 19, first, "v1") or "")
    assert not_ready_reason(cfg, 20, first, "v1") is None
    looked = {"looks": 2, "holdout": 100}
    reason = not_ready_reason(cfg, 124, looked, "v1")
    assert reason is not None and "needs new evidence: 125 (now 124)" in reason and "v1" in reason
    assert not_ready_reason(cfg, 125, looked, "v1") is None
