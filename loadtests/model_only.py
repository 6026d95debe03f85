"""`cascade bench --model-only`: the student's own limit on this machine, with no HTTP and no Ray.

The gateway's req/s and p50 mean little without the model's ceiling beside them: this measures the int8
student exactly as a server calls it (``StudentRuntime.logits``, tokenization included), in two tables:

- arrangements: one text per call in each arrangement a server on this CPU could choose: threads per session,
  and sessions in parallel as separate processes (each its own ONNX Runtime session, so no GIL or shared thread
  pool between them);
- texts per call (1, 8, 32) on one session with one thread, as a Gateway replica runs its batches. A statically
  quantized student runs them as padded, length-sorted batches, one ``session.run`` each; a dynamic one (whose
  answers would change in a padded batch) one text per ``session.run``, so its rows show what a batch saves
  without padding. The table says which.

``python -m loadtests.model_only --onnx A.onnx --onnx B.onnx --tokenizer DIR --texts FILE`` runs the second
table for several student files side by side (a dynamic and a static export of one student, say).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.queues import Queue
from pathlib import Path

import numpy as np

SHAPE_NOTE = ("arrangements: one text per call, unpadded, tokenization included; texts per call: one session on one "
              "thread, padded and length-sorted only where the student is statically quantized (a dynamic int8 "
              "student must not be padded: a padded batch changes its answers)")


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
BATCH_SIZES = (1, 8, 32)  # texts per call; the Gateway's student batches hold up to 32
BATCH_ARRANGEMENT = Arrangement(1, 1)  # a Gateway replica: one session, one ONNX Runtime thread


@dataclass(frozen=True)
class StudentSpec:
    """What a worker process needs to open its own StudentRuntime (paths pickle; sessions do not)."""

    onnx_path: Path
    tokenizer_dir: Path
    max_length: int
    run_size: int | None = None  # most texts per padded session.run (StudentRuntime's batch_size); None: its default


@dataclass
class Row:
    """One measured arrangement: texts/s over all its processes, and per-call latency over all calls.

    ``texts_per_call`` texts go in each call; ``padded``: whether the runtime ran them as one padded batch
    (None where not recorded)."""

    processes: int
    threads: int
    calls: int
    window_s: float
    texts_per_s: float
    p50_ms: float
    p99_ms: float
    texts_per_call: int = 1
    padded: bool | None = None


@dataclass
class ModelOnlyResult:
    rows: list[Row]
    best: Row
    batch1_p50_ms: float | None
    texts: int
    shape: str = SHAPE_NOTE
    batches: list[Row] = field(default_factory=list)


def summarise(arrangement: Arrangement, durations_s: list[list[float]], window_s: float,
              texts_per_call: int = 1, padded: bool | None = None) -> Row:
    """Reduce per-process call durations, all taken over one shared wall window, to one row.

    Throughput is every process's texts over the common window (not a sum of per-process rates), so a
    process that starved the others cannot make the total look higher than the wall clock allows.
    """
    calls = [d for process in durations_s for d in process]
    if not calls or window_s <= 0:
        raise ValueError(f"{arrangement.name}: no calls measured")
    p50, p99 = np.percentile(np.asarray(calls) * 1000.0, [50, 99])
    return Row(arrangement.processes, arrangement.threads, len(calls), window_s,
               len(calls) * texts_per_call / window_s, float(p50), float(p99), texts_per_call, padded)


def choose_best(rows: list[Row]) -> Row:
    """The row with the most texts/s; on a tie the lower p50 (the cheaper way to the same throughput)."""
    if not rows:
        raise ValueError("no rows to choose from")
    return max(rows, key=lambda r: (r.texts_per_s, -r.p50_ms))


def batch1_p50(rows: list[Row]) -> float | None:
    """Sequential batch-1 latency: the p50 of one session with two threads, the only load on the machine."""
    return next((r.p50_ms for r in rows if (r.processes, r.threads) == (BATCH1.processes, BATCH1.threads)), None)


def _call_texts(texts: list[str], call: int, per_call: int) -> list[str]:
    """The texts of the ``call``-th call: the next ``per_call`` texts, wrapping round."""
    return [texts[(call * per_call + k) % len(texts)] for k in range(per_call)]


def _worker(spec: StudentSpec, threads: int, texts: list[str], offset: int, warmup: int,
            ready: Queue, start: Queue, results: Queue, per_call: int = 1) -> None:
    """One process, one session: warm up, wait for the shared window, then call ``per_call`` texts at a time."""
    from bundle.runtime import StudentRuntime

    runtime = StudentRuntime(spec.onnx_path, spec.tokenizer_dir, spec.max_length, threads,
                             **({} if spec.run_size is None else {"batch_size": spec.run_size}))
    for i in range(warmup):
        runtime.logits(_call_texts(texts, offset + i, per_call))
    ready.put(True)
    start_at, end_at = start.get()
    time.sleep(max(0.0, start_at - time.monotonic()))
    durations: list[float] = []
    i = offset
    while (now := time.monotonic()) < end_at:
        runtime.logits(_call_texts(texts, i, per_call))
        durations.append(time.monotonic() - now)
        i += 1
    results.put((durations, time.monotonic() - start_at, runtime.padded))


def measure(spec: StudentSpec, arrangement: Arrangement, texts: list[str], seconds: float,
            warmup: int = 20, per_call: int = 1) -> Row:
    """Spawn the arrangement's processes, start them together once all are warm, and summarise.

    'spawn' gives each process a fresh interpreter and its own ONNX Runtime thread pool, as separate
    server processes would have; CLOCK_MONOTONIC is system-wide on Linux, so one start time serves all.
    """
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    starts = [ctx.Queue() for _ in range(arrangement.processes)]
    stride = max(1, len(texts) // arrangement.processes)
    workers = [ctx.Process(target=_worker, args=(spec, arrangement.threads, texts, n * stride, warmup,
                                                 ready, starts[n], results, per_call), daemon=True)
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
    return summarise(arrangement, [d for d, _, _ in outcomes], max(elapsed for _, elapsed, _ in outcomes),
                     per_call, outcomes[0][2])


def run_model_only(spec: StudentSpec, texts: list[str], seconds: float,
                   arrangements: tuple[Arrangement, ...] = ARRANGEMENTS,
                   batch_sizes: tuple[int, ...] = BATCH_SIZES) -> ModelOnlyResult:
    """Measure each arrangement, then each number of texts per call, in turn (never two at once: they would
    share the cores)."""
    if not texts:
        raise ValueError("no texts to measure with")
    rows = [measure(spec, arrangement, texts, seconds) for arrangement in arrangements]
    batches = measure_batches(spec, texts, seconds, batch_sizes)
    return ModelOnlyResult(rows, choose_best(rows), batch1_p50(rows), len(texts), batches=batches)


def measure_batches(spec: StudentSpec, texts: list[str], seconds: float,
                    batch_sizes: tuple[int, ...] = BATCH_SIZES) -> list[Row]:
    """``StudentRuntime.logits`` on ``b`` texts per call for each ``b``, one session on one thread."""
    return [measure(spec, BATCH_ARRANGEMENT, texts, seconds, per_call=b) for b in batch_sizes]


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
    if result.batches:
        lines += ["", format_batches(result.batches)]
    return "\n".join(lines)


def format_batches(rows: list[Row], title: str = "") -> str:
    """The texts-per-call table: texts/s, per-call latency, and the gain over one text per call."""
    single = next((r.texts_per_s for r in rows if r.texts_per_call == 1), None)
    padded = {r.padded for r in rows}
    how = ("padded, length-sorted batches (static int8)" if padded == {True} else
           "one text per session.run (not padded: dynamic int8 or unmarked student)" if padded == {False} else
           "padding as each row says")
    header = f"{'texts per call':<16}{'texts/s':>10}{'x 1/call':>10}{'p50 ms':>9}{'p99 ms':>9}{'calls':>8}"
    lines = [f"{title + ': ' if title else ''}{BATCH_ARRANGEMENT.name}, {how}", header, "-" * len(header)]
    for r in rows:
        gain = f"{r.texts_per_s / single:.2f}" if single else "-"
        lines.append(f"{r.texts_per_call:<16}{r.texts_per_s:>10.1f}{gain:>10}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
                     f"{r.calls:>8}")
    return "\n".join(lines)


def model_only_json(result: ModelOnlyResult) -> str:
    return json.dumps(asdict(result), indent=2)


def main(argv: list[str] | None = None) -> int:
    """Texts per call for several student files on the same texts, one after the other (see the module doc)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m loadtests.model_only", description=main.__doc__)
    parser.add_argument("--onnx", type=Path, action="append", required=True, help="a student file (repeatable)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="the folder holding its tokenizer.json")
    parser.add_argument("--texts", type=Path, required=True, help="a text file, one text per line")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="per row")
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCH_SIZES), help="texts per call")
    parser.add_argument("--run-size", type=int, nargs="+", default=[None],
                        help="most texts per padded session.run (StudentRuntime's batch_size); several: one table each")
    args = parser.parse_args(argv)
    texts = [line for line in args.texts.read_text().splitlines() if line.strip()]
    if not texts:
        parser.error(f"no texts in {args.texts}")
    for path in args.onnx:
        for run_size in args.run_size:
            rows = measure_batches(StudentSpec(path, args.tokenizer, args.max_length, run_size), texts,
                                   args.seconds, tuple(args.batch))
            title = str(path) if run_size is None else f"{path}, runs of up to {run_size}"
            print(format_batches(rows, title), "\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
