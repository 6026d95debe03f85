"""Measure a re-distillation recipe on the shifted domain, offline: `python -m distill.recipes`.

The drift demo (`make drift-demo`) shows the loop through a live gateway; choosing a recipe needs many
runs, so this bench skips the gateway. It writes the records a gateway would have written for one
stream of Amazon snippets (the drift demo's split for ``--seed``: every deferred text a fallback
record, a ``--shadow`` share of the others shadow records, and true labels for ``--feedback`` texts),
re-distils with the given `RedistillConfig` fields in a throwaway copy of the model home, registers the
candidate whatever the gate says, and measures it on the held-out Amazon texts: disagreement with the
teacher, the teacher share needed for 97% agreement, accuracy, and base test accuracy. It prints one
JSON line (and the gate's verdict) per run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import typer

from bundle.registry import Registry, home_with_current
from bundle.runtime import StudentRuntime
from bundle.teachers import open_teacher, teacher_logits_sync
from distill.data import load_amazon_snippets
from distill.evaluate import teacher_cache_dir
from distill.redistill import RedistillConfig, redistill
from records.queue import AnswerRecord, SqliteQueue, feedback_records, teacher_answer_records
from routing.calibration import choose_threshold, sweep
from routing.confidence import ConfidenceMeasure, confidence, softmax

HOLDOUT_SHARE = 0.3  # the drift demo's split: the same seed holds out the same texts


def simulated_records(texts: list[str], labels: np.ndarray, student_probs: np.ndarray, teacher_probs: np.ndarray,
                      stream: np.ndarray, threshold: float, shadow: float, feedback: int, seed: int,
                      student_version: str, teacher_version: str,
                      measure: ConfidenceMeasure = ConfidenceMeasure.MAX_PROB) -> list[AnswerRecord]:
    """The records a gateway would have written for ``stream`` (indices into ``texts``), made by the gateway's
    own record rules (records.queue), so the bench learns from what the loop would really queue.

    Every deferred text (confidence below ``threshold``) is a fallback record with sampling probability 1
    (a gateway with ``queue.keep=all``); each other text is shadowed when its draw from
    ``default_rng(seed + 100)`` is below ``shadow`` and recorded with sampling probability ``shadow``;
    the first ``feedback`` streamed texts also come back with their true labels. Records are in stream
    order, feedback last. There is one draw per streamed text, deferred or not, so a seed shadows the same
    texts whatever the threshold.
    """
    confidences = confidence(student_probs[stream], measure)
    deferred = confidences < threshold
    draws = np.random.default_rng(seed + 100).random(len(stream))
    shadowed = ~deferred & (draws < shadow)

    def answered(mask: np.ndarray, reason: Literal["fallback", "shadow"],
                 probability: float) -> dict[int, AnswerRecord]:
        """The teacher's answers for the streamed texts in ``mask``, by stream position."""
        index = stream[mask]
        records = teacher_answer_records([texts[i] for i in index], student_probs[index], teacher_probs[index],
                                         student_version, teacher_version, reason, keep="all",
                                         sampling_probability=probability, threshold=threshold,
                                         confidences=confidences[mask], agreement_share=shadow)
        return dict(zip(np.flatnonzero(mask).tolist(), records, strict=True))

    by_position = answered(deferred, "fallback", 1.0) | answered(shadowed, "shadow", shadow)
    labelled = stream[:feedback]
    return [by_position[position] for position in sorted(by_position)] + feedback_records(
        [texts[i] for i in labelled], [int(labels[i]) for i in labelled], student_probs[labelled],
        teacher_probs[labelled], student_version, teacher_version, threshold,
        confidence(student_probs[labelled], measure))


def _share_for_97(probs: np.ndarray, teacher_probs: np.ndarray, measure: str) -> float:
    return choose_threshold(sweep(probs, teacher_probs, None, ConfidenceMeasure(measure)),
                            target_agreement=0.97).teacher_share


def measure(home: Path, overrides: dict, seed: int, shadow: float, feedback: int) -> dict:
    """One recipe on one stream; see the module docstring."""
    parent = Registry(home).load()
    m = parent.manifest
    amazon = load_amazon_snippets()
    student = StudentRuntime(parent.student_path, parent.tokenizer_dir, m.max_length, 2)
    teacher = open_teacher(m.teacher, parent.path, m.labels, max_length=m.max_length, threads=2)
    student_logits = student.logits(amazon.texts)
    teacher_logits = teacher_logits_sync(teacher, amazon.texts, teacher_cache_dir(parent))
    student_probs = softmax(student_logits, m.temperatures.student)
    teacher_probs = softmax(teacher_logits, m.temperatures.teacher)
    order = np.random.default_rng(seed).permutation(len(amazon))
    cut = int(len(order) * HOLDOUT_SHARE)
    held, stream = order[:cut], order[cut:]
    records = simulated_records(amazon.texts, amazon.labels, student_probs, teacher_probs, stream, m.threshold, shadow,
                                feedback, seed, parent.version, parent.teacher_version,
                                ConfidenceMeasure(m.confidence_measure))
    work = home_with_current(home, prefix="cascade-recipe-")
    try:
        queue = SqliteQueue(work / "queue.db")
        queue.append(records)
        cfg = RedistillConfig.model_validate(overrides | {"promote": False, "register_whatever_the_gate_says": True})
        result = redistill(work, queue, cfg)
        if result.version is None:
            raise SystemExit(f"no candidate: {result.status}: {result.message}")
        new = Registry(work).load(result.version)
        candidate = StudentRuntime(new.student_path, new.tokenizer_dir, m.max_length, 2)
        new_logits = candidate.logits([amazon.texts[i] for i in held])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    teacher_answer, labels = teacher_logits[held].argmax(-1), amazon.labels[held]
    old, new_answer = student_logits[held].argmax(-1), new_logits.argmax(-1)
    gate = result.gate
    return {
        "recipe": overrides, "seed": seed, "shadow": shadow, "feedback": feedback, "records": len(records),
        "held_out_texts": len(held), "gate": gate["outcome"], "gate_reasons": gate["reasons"],
        "disagreement_before": float((old != teacher_answer).mean()),
        "disagreement_after": float((new_answer != teacher_answer).mean()),
        "share_for_97_before": _share_for_97(student_probs[held], teacher_probs[held], m.confidence_measure),
        "share_for_97_after": _share_for_97(softmax(new_logits, new.manifest.temperatures.student),
                                            teacher_probs[held], m.confidence_measure),
        "accuracy_before": float((old == labels).mean()), "accuracy_after": float((new_answer == labels).mean()),
        "teacher_accuracy": float((teacher_answer == labels).mean()),
        "base_test_before": gate["current_test_accuracy"], "base_test_after": gate["new_test_accuracy"],
        "base_test_disagreement_before": 1 - gate["current_test_agreement"],
        "base_test_disagreement_after": 1 - gate["new_test_agreement"],
        "checkpoints": gate["checkpoints"], "base_val_floor": gate["base_val_floor"],
    }


def main(
    recipe: Annotated[str, typer.Argument(help='RedistillConfig fields as JSON, e.g. \'{"label_weight": 0}\'.')] = "{}",
    home: Annotated[Path, typer.Option(help="Model home with the current bundle.")] = Path("models"),
    seed: Annotated[int, typer.Option(help="The drift demo's seed: which texts are held out, stream order.")] = 7,
    shadow: Annotated[float, typer.Option(min=0.01, max=1.0, help="Shadow share of the simulated gateway.")] = 0.9,
    feedback: Annotated[int, typer.Option(min=0, help="Streamed texts sent with their true labels.")] = 500,
) -> None:
    typer.echo(json.dumps(measure(home, json.loads(recipe), seed, shadow, feedback)))


if __name__ == "__main__":
    typer.run(main)
