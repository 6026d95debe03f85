"""What the gateway's cascade records for the loop (serving/cascade.py with a fake teacher, real SQLite queue)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from records.queue import SqliteQueue
from records.writer import RecordWriter
from routing.policy import Route
from tests.fakes import FakeStudent, make_cascade


def recorded(tmp_path: Path, shadow_share: float, texts: list[str],
             feedback: tuple[list[str], list[str]] | None = None):
    """Run one auto request (and optional feedback) through a router and return the queued records."""
    path = tmp_path / "queue.db"
    writer = RecordWriter(lambda: SqliteQueue(path), flush_interval_s=0.05)
    # scale -1: the student answers label 1 like the fake teacher, sure on "sure" texts, unsure on the rest.
    router = make_cascade(fake_student=FakeStudent(scale=-1.0), writer=writer,
                          shadow={"share": shadow_share, "max_concurrency": 8}, teacher={"max_share": 1.0},
                          queue={"keep": "disagreements"})

    async def go() -> None:
        await router.classify(texts, Route.AUTO)
        if feedback:
            await router.feedback(*feedback)
        await asyncio.sleep(0.05)
        await asyncio.gather(*router._background)

    asyncio.run(go())
    router.writer.close()
    return list(SqliteQueue(path).export()), router


def test_shadow_agreements_are_kept_with_their_sampling_probability(tmp_path: Path) -> None:
    records, router = recorded(tmp_path, 1.0, ["sure a", "sure c", "hmm b"])
    shadow = sorted((r for r in records if r.reason == "shadow"), key=lambda r: r.text)
    assert [r.text for r in shadow] == ["sure a", "sure c"]
    assert all(not r.disagree and r.sampling_probability == 1.0 and r.threshold == 0.9 for r in shadow)
    assert all(r.confidence is not None and r.confidence > 0.9 for r in shadow)
    fallback = [r for r in records if r.reason == "fallback"]
    # An agreeing fallback under keep: disagreements is kept at the shadow share (here all of them).
    assert [r.text for r in fallback] == ["hmm b"] and fallback[0].confidence < 0.9
    agreement, accuracy = router.evidence.estimate()
    assert agreement is not None and agreement.value == 1.0 and agreement.records == 3 and accuracy is None


def test_without_shadow_sampling_agreeing_fallbacks_are_dropped(tmp_path: Path) -> None:
    records, _ = recorded(tmp_path, 0.0, ["sure a", "hmm b"])
    assert records == []


def test_feedback_is_queued_with_its_label_and_counts_in_the_live_accuracy(tmp_path: Path) -> None:
    records, router = recorded(tmp_path, 0.0, ["sure a"], feedback=(["sure x", "hmm y"], ["neg", "pos"]))
    labelled = sorted((r for r in records if r.reason == "feedback"), key=lambda r: r.text)
    assert [(r.text, r.label) for r in labelled] == [("hmm y", 1), ("sure x", 0)]
    assert all(r.teacher_probs is not None and r.threshold == 0.9 for r in labelled)
    _, accuracy = router.evidence.estimate()
    assert accuracy is not None and accuracy.value == 0.5 and accuracy.records == 2  # both answer label 1
