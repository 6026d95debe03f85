"""The recipe bench's simulated gateway records and its throwaway model homes (no Ray, no training)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bundle.registry import BundleError, Registry, home_with_current
from distill.recipes import simulated_records
from routing.confidence import ConfidenceMeasure

THRESHOLD = 0.7
SEED = 3


def probs_with_top(top: np.ndarray) -> np.ndarray:
    """Two-label probabilities whose max is ``top`` (label 0 wins)."""
    return np.stack([top, 1 - top], axis=-1)


def stream_case(n: int = 400, shadow: float = 0.3, feedback: int = 10) -> dict:
    """Texts of which a known set is deferred (confidence below THRESHOLD), streamed in a shuffled order."""
    rng = np.random.default_rng(0)
    top = np.where(np.arange(n) % 3 == 0, 0.55, 0.9)  # every third text is deferred
    teacher_top = rng.uniform(0.2, 1.0, n)  # the teacher sometimes disagrees (top < 0.5: label 1)
    return dict(texts=[f"text {i}" for i in range(n)], labels=rng.integers(0, 2, n), student_probs=probs_with_top(top),
                teacher_probs=probs_with_top(teacher_top), stream=rng.permutation(n)[: n * 3 // 4],
                threshold=THRESHOLD, shadow=shadow, feedback=feedback, seed=SEED, student_version="s1",
                teacher_version="t1")


def split(records: list) -> tuple[list, list, list]:
    return ([r for r in records if r.reason == "fallback"], [r for r in records if r.reason == "shadow"],
            [r for r in records if r.reason == "feedback"])


def stream_draws(case: dict) -> np.ndarray:
    """The bench's contract: one draw per streamed text from default_rng(seed + 100) picks the shadowed texts."""
    return np.random.default_rng(case["seed"] + 100).random(len(case["stream"]))


def test_every_deferred_text_is_a_fallback_record_with_probability_one() -> None:
    case = stream_case()
    fallback, shadow, _ = split(simulated_records(**case))
    deferred = [case["texts"][i] for i in case["stream"] if case["student_probs"][i].max() < THRESHOLD]
    assert deferred and [r.text for r in fallback] == deferred
    assert all(r.sampling_probability == 1.0 and r.threshold == THRESHOLD and r.confidence < THRESHOLD
               for r in fallback)
    assert not {r.text for r in shadow} & set(deferred)


def test_shadow_records_are_the_student_served_texts_whose_draw_is_below_the_share() -> None:
    case = stream_case(shadow=0.3)
    _, shadow, _ = split(simulated_records(**case))
    draws = stream_draws(case)
    expected = [case["texts"][i] for i, draw in zip(case["stream"], draws, strict=True)
                if case["student_probs"][i].max() >= THRESHOLD and draw < 0.3]
    assert expected and [r.text for r in shadow] == expected
    assert all(r.sampling_probability == 0.3 and r.confidence >= THRESHOLD for r in shadow)
    for record in shadow:
        i = case["texts"].index(record.text)
        assert record.teacher_probs == pytest.approx(case["teacher_probs"][i].tolist())
        assert record.disagree == bool(case["student_probs"][i].argmax() != case["teacher_probs"][i].argmax())


def test_a_deferred_text_is_fallback_whatever_its_draw_and_a_served_text_over_the_share_is_not_recorded() -> None:
    """Fails if the fallback and shadow rules were swapped or merged: deferred texts whose draw is under the
    share must still be fallback records at probability 1, and served texts whose draw is over it absent."""
    case = stream_case(shadow=0.5)
    records = simulated_records(**case)
    by_text = {r.text: r for r in records if r.reason != "feedback"}
    draws = stream_draws(case)
    deferred = case["student_probs"][case["stream"]].max(-1) < THRESHOLD
    low_draw_deferred = [case["texts"][i] for i, d, draw in zip(case["stream"], deferred, draws, strict=True)
                         if d and draw < 0.5]
    high_draw_deferred = [case["texts"][i] for i, d, draw in zip(case["stream"], deferred, draws, strict=True)
                          if d and draw >= 0.5]
    high_draw_served = [case["texts"][i] for i, d, draw in zip(case["stream"], deferred, draws, strict=True)
                        if not d and draw >= 0.5]
    assert low_draw_deferred and high_draw_deferred and high_draw_served
    for text in low_draw_deferred + high_draw_deferred:
        assert by_text[text].reason == "fallback" and by_text[text].sampling_probability == 1.0
    assert not set(high_draw_served) & set(by_text)


def test_records_come_in_stream_order_with_feedback_last() -> None:
    case = stream_case()
    records = simulated_records(**case)
    position = {case["texts"][i]: p for p, i in enumerate(case["stream"])}
    traffic = [position[r.text] for r in records if r.reason != "feedback"]
    assert traffic == sorted(traffic)
    assert [r.reason for r in records[-case["feedback"]:]] == ["feedback"] * case["feedback"]


def test_feedback_texts_are_the_first_streamed_ones_and_carry_their_labels() -> None:
    case = stream_case(feedback=12)
    _, _, feedback = split(simulated_records(**case))
    first = case["stream"][:12]
    assert [r.text for r in feedback] == [case["texts"][i] for i in first]
    assert [r.label for r in feedback] == [int(case["labels"][i]) for i in first]
    assert all(r.teacher_probs is not None and r.threshold == THRESHOLD for r in feedback)
    assert not split(simulated_records(**(case | {"feedback": 0})))[2]


def test_records_weighted_by_their_sampling_probability_stand_for_the_whole_stream() -> None:
    """What the gate's held-out split and the live estimates rely on: sum(1 / p) estimates the stream size.
    Shadowed count ~ Binomial(n_served, s), so the estimate's standard error is sqrt(n_served (1 - s) / s)."""
    case = stream_case(n=20_000, shadow=0.2, feedback=0)
    records = simulated_records(**case)
    estimate = sum(1 / r.sampling_probability for r in records)
    served = int((case["student_probs"][case["stream"]].max(-1) >= THRESHOLD).sum())
    standard_error = np.sqrt(served * 0.8 / 0.2)
    assert abs(estimate - len(case["stream"])) < 4 * standard_error


def test_the_confidence_measure_decides_deferral_as_in_the_gateway() -> None:
    """A 0.6/0.4 answer is sure enough by max_prob at 0.55, not by margin (0.2)."""
    case = stream_case(n=30, feedback=0) | {"threshold": 0.55}
    case["student_probs"] = probs_with_top(np.full(30, 0.6))
    by_max = simulated_records(**case)
    by_margin = simulated_records(**case, measure=ConfidenceMeasure.MARGIN)
    assert not split(by_max)[0]
    assert len(split(by_margin)[0]) == len(case["stream"])
    assert all(r.confidence == pytest.approx(0.2) for r in by_margin)


def make_home(root: Path, current: str | None = "v1") -> Path:
    version = root / "registry" / "v1"
    (version / "tokenizer").mkdir(parents=True)
    (version / "student.onnx").write_bytes(b"weights")
    (version / "manifest.json").write_text("{}")
    (version / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    if current:
        (root / "registry" / "current").write_text(current + "\n")
    return root


def test_home_with_current_links_the_bundle_and_shares_the_teacher_answer_cache(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    target = home_with_current(home, prefix="cascade-test-")
    try:
        assert Registry(target).current_version() == "v1" and Registry(target).versions() == ["v1"]
        assert os.path.samefile(target / "registry" / "v1" / "student.onnx", home / "registry" / "v1" / "student.onnx")
        cache = target / "work" / "teacher_answers"
        assert cache.is_symlink() and cache.resolve() == (home / "work" / "teacher_answers").resolve()
        (cache / "answer.npy").write_bytes(b"x")  # written through the link: the source home's cache sees it
        assert (home / "work" / "teacher_answers" / "answer.npy").read_bytes() == b"x"
        Registry(target).current_file.write_text("v2\n")
        assert Registry(home).current_version() == "v1"
    finally:
        shutil.rmtree(target)


def test_home_with_current_without_a_current_bundle_is_an_error(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home", current=None)
    with pytest.raises(BundleError, match="no current bundle"):
        home_with_current(home, prefix="cascade-test-")


def test_drift_demo_says_how_to_get_a_bundle(tmp_path: Path) -> None:
    from cli.drift_demo import _private_home

    with pytest.raises(SystemExit, match="run `make models` first"):
        _private_home(make_home(tmp_path / "home", current=None))
