"""The arithmetic behind `cascade bench --model-only`, on synthetic timings: no model, no process spawned."""

from __future__ import annotations

import json

import pytest

from loadtests.model_only import (
    Arrangement,
    ModelOnlyResult,
    Row,
    batch1_p50,
    choose_best,
    format_batches,
    format_model_only,
    model_only_json,
    summarise,
)


def _row(processes: int, threads: int, texts_per_s: float, p50_ms: float) -> Row:
    return Row(processes, threads, 100, 1.0, texts_per_s, p50_ms, p50_ms * 2)


def test_throughput_counts_every_process_over_the_shared_window() -> None:
    # Two processes, 1 ms and 3 ms calls, over one 2 s window: (200 + 100) calls / 2 s, not 1000/s + 333/s.
    row = summarise(Arrangement(2, 1), [[0.001] * 200, [0.003] * 100], window_s=2.0)
    assert (row.processes, row.threads, row.calls) == (2, 1, 300)
    assert row.texts_per_s == pytest.approx(150.0)


def test_percentiles_pool_all_calls_in_milliseconds() -> None:
    durations = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms, one call each
    row = summarise(Arrangement(1, 2), [durations[:50], durations[50:]], window_s=5.0)
    assert row.p50_ms == pytest.approx(50.5)
    assert row.p99_ms == pytest.approx(99.01)


def test_no_calls_is_an_error_not_a_zero_row() -> None:
    with pytest.raises(ValueError):
        summarise(Arrangement(1, 1), [[]], window_s=1.0)


def test_best_is_the_highest_throughput_and_ties_go_to_lower_latency() -> None:
    rows = [_row(1, 1, 90.0, 11.0), _row(1, 2, 120.0, 8.0), _row(2, 1, 120.0, 16.0)]
    assert (choose_best(rows).processes, choose_best(rows).threads) == (1, 2)
    rows.append(_row(2, 1, 150.0, 13.0))
    assert choose_best(rows) is rows[-1]
    with pytest.raises(ValueError):
        choose_best([])


def test_batch1_p50_is_the_two_thread_single_session_row() -> None:
    rows = [_row(1, 1, 90.0, 11.0), _row(1, 2, 120.0, 8.0), _row(2, 1, 150.0, 13.0)]
    assert batch1_p50(rows) == 8.0
    assert batch1_p50(rows[:1]) is None


def test_table_and_json_carry_the_same_numbers() -> None:
    rows = [_row(1, 2, 120.0, 8.0), _row(2, 1, 150.0, 13.0)]
    result = ModelOnlyResult(rows, choose_best(rows), batch1_p50(rows), texts=500)
    text = format_model_only(result)
    assert "best: 150.0 texts/s with 2 x 1 thread" in text
    assert "batch-1 p50 (1 x 2 threads" in text and "8.00 ms" in text
    assert "must not be padded" in text
    data = json.loads(model_only_json(result))
    assert data["best"]["texts_per_s"] == 150.0 and data["batch1_p50_ms"] == 8.0
    assert [r["texts_per_s"] for r in data["rows"]] == [120.0, 150.0]


def test_texts_per_call_rows_count_texts_and_show_the_gain_over_one_per_call() -> None:
    # 8 texts per call, 250 calls of 4 ms over 1 s: 2000 texts/s, per-call latency stays per call.
    row = summarise(Arrangement(1, 1), [[0.004] * 250], window_s=1.0, texts_per_call=8, padded=True)
    assert (row.calls, row.texts_per_call, row.padded) == (250, 8, True)
    assert row.texts_per_s == pytest.approx(2000.0) and row.p50_ms == pytest.approx(4.0)
    one = summarise(Arrangement(1, 1), [[0.002] * 500], window_s=1.0, padded=True)
    table = format_batches([one, row])
    assert "padded, length-sorted batches" in table and "4.00" in table
    assert table.splitlines()[-1].split()[:3] == ["8", "2000.0", "4.00"]
    unpadded = format_batches([summarise(Arrangement(1, 1), [[0.002] * 10], 1.0, 1, False)])
    assert "one text per session.run" in unpadded


def test_the_result_carries_the_batch_rows_in_text_and_json() -> None:
    rows = [_row(1, 2, 120.0, 8.0)]
    batches = [summarise(Arrangement(1, 1), [[0.002] * 100], 1.0, 1, True),
               summarise(Arrangement(1, 1), [[0.010] * 100], 1.0, 32, True)]
    result = ModelOnlyResult(rows, choose_best(rows), batch1_p50(rows), texts=500, batches=batches)
    assert "texts per call" in format_model_only(result)
    data = json.loads(model_only_json(result))
    assert [(b["texts_per_call"], b["texts_per_s"]) for b in data["batches"]] == [(1, 100.0), (32, 3200.0)]
