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
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from bundle.registry import Registry, link_tree
from bundle.runtime import StudentRuntime
from bundle.teachers import open_teacher, teacher_logits_sync
from distill.data import load_amazon_snippets
from distill.evaluate import teacher_cache_dir
from distill.redistill import RedistillConfig, redistill
from records.queue import DisagreementRecord, SqliteQueue, feedback_records
from routing.calibration import choose_threshold, sweep
from routing.confidence import ConfidenceMeasure, softmax

HOLDOUT_SHARE = 0.3  # the drift demo's split: the same seed holds out the same texts


def _throwaway_home(home: Path) -> Path:
    source = Registry(home)
    version = source.current_version()
    if version is None:
        raise SystemExit(f"no current bundle in {home}")
    target = Path(tempfile.mkdtemp(prefix="cascade-recipe-"))
    (target / "registry").mkdir()
    link_tree(source.root / version, target / "registry" / version)
    (target / "registry" / "current").write_text(version + "\n")
    answers = home / "work" / "teacher_answers"
    answers.mkdir(parents=True, exist_ok=True)
    (target / "work").mkdir()
    (target / "work" / "teacher_answers").symlink_to(answers.resolve(), target_is_directory=True)
    return target


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
    draws = np.random.default_rng(seed + 100).random(len(stream))
    records = []
    for i, draw in zip(stream, draws, strict=True):
        confidence = float(student_probs[i].max())
        deferred = confidence < m.threshold
        if deferred or draw < shadow:
            records.append(DisagreementRecord(
                text=amazon.texts[i], student_probs=student_probs[i].tolist(), teacher_probs=teacher_probs[i].tolist(),
                student_version=parent.version, teacher_version=parent.teacher_version,
                reason="fallback" if deferred else "shadow", disagree=bool(student_probs[i].argmax()
                                                                           != teacher_probs[i].argmax()),
                sampling_probability=1.0 if deferred else shadow, threshold=m.threshold, confidence=confidence))
    labelled = stream[:feedback]
    records += feedback_records([amazon.texts[i] for i in labelled], [int(amazon.labels[i]) for i in labelled],
                                student_probs[labelled], teacher_probs[labelled], parent.version,
                                parent.teacher_version, m.threshold, student_probs[labelled].max(-1))
    work = _throwaway_home(home)
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
