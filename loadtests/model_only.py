"""`cascade bench --model-only`: the student's own limit on this machine, with no HTTP, no Ray, no batching.

The gateway's req/s and p50 mean little without the model's ceiling beside them: this measures the int8
student exactly as a server calls it (one text per call, unpadded, tokenization included) in each
arrangement a server on this CPU could choose: threads per session, and sessions in parallel as separate
processes (each its own ONNX Runtime session, so no GIL or shared thread pool between them). Texts per
call stay at one: dynamic int8 quantization scales by the whole input tensor, so a padded batch would
change answers (see ``bundle.runtime.StudentRuntime``).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from multiprocessing.queues import Queue
from pathlib import Path

import numpy as np

SHAPE_NOTE = ("one text per call, unpadded, tokenization included: the dynamic int8 student must not be padded "
              "(a padded batch changes its answers), so batch shape is not searched")


@dataclass(frozen=True)
class Arrangement:
    """How a server could run the student: ``processes`` sessions in parallel, each with ``threads`` threads."""

    processes: int
    threads: int

    @property
    def name(self) -> str:
        return f"{self.processes} x {self.threads} thread{'s' if self.threads > 1 else ''}"


# 1 x 2 is also the batch-1 latency figure: one idle session, sequential calls, both cores for each call.
ARRANGEMENTS = (Arrangement(1, 1), Arrangement(1, 2), Arrangement(2, 1))
BATCH1 = Arrangement(1, 2)


@dataclass(frozen=True)
class StudentSpec:
    """What a worker process needs to open its own StudentRuntime (paths pickle; sessions do not)."""

    onnx_path: Path
    tokenizer_dir: Path
    max_length: int


@dataclass
class Row:
    """One measured arrangement: texts/s over all its processes, and per-call latency over all calls."""

    processes: int
    threads: int
    calls: int
    window_s: float
    texts_per_s: float
    p50_ms: float
    p99_ms: float


@dataclass
class ModelOnlyResult:
    rows: list[Row]
    best: Row
    batch1_p50_ms: float | None
    texts: int
    shape: str = SHAPE_NOTE


def summarise(arrangement: Arrangement, durations_s: list[list[float]], window_s: float) -> Row:
    """Reduce per-process call durations, all taken over one shared wall window, to one row.

    Throughput is every process's calls over the common window (not a sum of per-process rates), so a
    process that starved the others cannot make the total look higher than the wall clock allows.
    """
    calls = [d for process in durations_s for d in process]
    if not calls or window_s <= 0:
        raise ValueError(f"{arrangement.name}: no calls measured")
    p50, p99 = np.percentile(np.asarray(calls) * 1000.0, [50, 99])
    return Row(arrangement.processes, arrangement.threads, len(calls), window_s, len(calls) / window_s,
               float(p50), float(p99))


def choose_best(rows: list[Row]) -> Row:
    """The row with the most texts/s; on a tie the lower p50 (the cheaper way to the same throughput)."""
    if not rows:
        raise ValueError("no rows to choose from")
    return max(rows, key=lambda r: (r.texts_per_s, -r.p50_ms))


def batch1_p50(rows: list[Row]) -> float | None:
    """Sequential batch-1 latency: the p50 of one session with two threads, the only load on the machine."""
    return next((r.p50_ms for r in rows if (r.processes, r.threads) == (BATCH1.processes, BATCH1.threads)), None)


def _worker(spec: StudentSpec, threads: int, texts: list[str], offset: int, warmup: int,
            ready: Queue, start: Queue, results: Queue) -> None:
    """One process, one session: warm up, wait for the shared window, then call one text at a time."""
    from bundle.runtime import StudentRuntime

    runtime = StudentRuntime(spec.onnx_path, spec.tokenizer_dir, spec.max_length, threads)
    for i in range(warmup):
        runtime.logits([texts[(offset + i) % len(texts)]])
    ready.put(True)
    start_at, end_at = start.get()
    time.sleep(max(0.0, start_at - time.monotonic()))
    durations: list[float] = []
    i = offset
    while (now := time.monotonic()) < end_at:
        runtime.logits([texts[i % len(texts)]])
        durations.append(time.monotonic() - now)
        i += 1
    results.put((durations, time.monotonic() - start_at))


def measure(spec: StudentSpec, arrangement: Arrangement, texts: list[str], seconds: float,
            warmup: int = 20) -> Row:
    """Spawn the arrangement's processes, start them together once all are warm, and summarise.

    'spawn' gives each process a fresh interpreter and its own ONNX Runtime thread pool, as separate
    server processes would have; CLOCK_MONOTONIC is system-wide on Linux, so one start time serves all.
    """
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    starts = [ctx.Queue() for _ in range(arrangement.processes)]
    stride = max(1, len(texts) // arrangement.processes)
    workers = [ctx.Process(target=_worker, args=(spec, arrangement.threads, texts, n * stride, warmup,
                                                 ready, starts[n], results), daemon=True)
               for n in range(arrangement.processes)]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            ready.get(timeout=300)
        start_at = time.monotonic() + 0.2
        for queue in starts:
            queue.put((start_at, start_at + seconds))
        outcomes = [results.get(timeout=seconds + 120) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
    return summarise(arrangement, [d for d, _ in outcomes], max(elapsed for _, elapsed in outcomes))


def run_model_only(spec: StudentSpec, texts: list[str], seconds: float,
                   arrangements: tuple[Arrangement, ...] = ARRANGEMENTS) -> ModelOnlyResult:
    """Measure each arrangement in turn (never two at once: they would share the cores)."""
    if not texts:
        raise ValueError("no texts to measure with")
    rows = [measure(spec, arrangement, texts, seconds) for arrangement in arrangements]
    return ModelOnlyResult(rows, choose_best(rows), batch1_p50(rows), len(texts))


def format_model_only(result: ModelOnlyResult) -> str:
    header = f"{'processes x threads':<22}{'texts/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'calls':>8}"
    lines = [f"student only, no HTTP, {result.texts} test texts; {result.shape}", header, "-" * len(header)]
    for r in result.rows:
        name = Arrangement(r.processes, r.threads).name
        lines.append(f"{name:<22}{r.texts_per_s:>10.1f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.calls:>8}")
    best = result.best
    lines.append(f"best: {best.texts_per_s:.1f} texts/s with {Arrangement(best.processes, best.threads).name}")
    if result.batch1_p50_ms is not None:
        lines.append(f"batch-1 p50 ({BATCH1.name}, sequential calls, nothing else in its process): "
                     f"{result.batch1_p50_ms:.2f} ms")
    return "\n".join(lines)


def model_only_json(result: ModelOnlyResult) -> str:
    return json.dumps(asdict(result), indent=2)
