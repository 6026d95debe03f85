"""`cascade calibrate --from-queue` and `cascade queue stats` on the tiny bundle, through the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.test_estimate import record_stream, simulated_stream, true_agreement

THRESHOLD = 0.8


@pytest.mark.integration  # the tiny bundle (a model build)
def test_calibrate_from_queue_saves_the_lower_bound_threshold_and_queue_stats_prints_the_estimate(
        tiny_home_copy) -> None:
    import json

    from typer.testing import CliRunner

    from bundle.registry import Registry
    from cli.main import app
    from records.queue import SqliteQueue

    bundle = Registry(tiny_home_copy).load()
    rng = np.random.default_rng(11)
    student_probs, teacher_label, confidence = simulated_stream(rng, 6000)
    records = record_stream(rng, student_probs, teacher_label, confidence, 0.2, "disagreements")
    records = [r.model_copy(update={"student_version": bundle.version, "teacher_version": bundle.teacher_version})
               for r in records]
    queue_url = f"sqlite:///{tiny_home_copy / 'queue.db'}"
    SqliteQueue(tiny_home_copy / "queue.db").append(records)
    runner = CliRunner()
    result = runner.invoke(app, ["calibrate", "--from-queue", "--home", str(tiny_home_copy), "--queue", queue_url,
                                 "--target-agreement", "0.95"])
    assert result.exit_code == 0, result.output
    chosen = json.loads(result.output)
    assert chosen["live_agreement_with_teacher"]["low"] >= 0.95
    assert Registry(tiny_home_copy).load().manifest.threshold == chosen["threshold"]
    truth = true_agreement(student_probs, teacher_label, confidence, chosen["threshold"])
    assert truth >= 0.95 - 0.01  # chosen on the lower bound: the real agreement holds the target
    stats = runner.invoke(app, ["queue", "stats", "--home", str(tiny_home_copy), "--queue", queue_url])
    assert stats.exit_code == 0, stats.output
    estimate = json.loads(stats.output)["estimate"]
    assert estimate["records_used"] == len(records)
    live = estimate["live_agreement"]
    assert live["low"] <= true_agreement(student_probs, teacher_label, confidence, THRESHOLD) <= live["high"]
    refused = runner.invoke(app, ["calibrate", "--from-queue", "--home", str(tiny_home_copy), "--queue", queue_url,
                                  "--target-agreement", "1.0"])
    assert refused.exit_code == 1 and "no threshold reaches" in refused.output
