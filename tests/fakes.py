"""Stand-ins for what the cascade talks to, for unit tests without Ray, servers or model builds.

Each implements the interface the real one does (``bundle.model.Model``, the cascade's ``MetricsSink``, the
queue writer's ``submit``), so a test drives ``serving.cascade.Cascade`` exactly as the Serve adapter does.
The student's logits are chosen per text because the routing under test depends on the student's confidence,
which a real tiny model does not let a test choose.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bundle.model import ThreadedModel
from bundle.registry import Bundle, Manifest, Registry, Temperatures
from routing.policy import DeferralPolicy
from serving.cascade import Cascade, Snapshot
from serving.settings import GatewayConfig

SURE = np.array([5.0, -5.0])
UNSURE = np.array([0.1, 0.0])
TEACHER_VERSION = "teacher-v1"


class FakeStudent(ThreadedModel):
    """Confident on texts starting with 'sure', unsure otherwise; ``scale`` tells two versions apart. Runs on
    its own worker thread, as the ONNX student does."""

    kind = "fake-student"

    def __init__(self, scale: float = 1.0, version: str = "v1", threads: int = 1) -> None:
        super().__init__()
        self.scale, self.version, self.threads = scale, version, threads
        self.labels = ["neg", "pos"]
        self.calls = 0
        self.batches: list[int] = []
        self.load()

    def run(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.batches.append(len(texts))
        return np.stack([SURE if t.startswith("sure") else UNSURE for t in texts]) * self.scale


class BlockedStudent(FakeStudent):
    """A student whose call blocks in its worker thread until ``release`` is set (a queue builds behind it)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def run(self, texts: list[str]) -> np.ndarray:
        self.release.wait(timeout=10)
        return super().run(texts)


class FakeTeacher:
    """An async teacher that answers label 1, or sleeps, fails, or waits for ``gate``, as a test sets it."""

    kind = "fake-teacher"

    def __init__(self) -> None:
        self.labels = ["neg", "pos"]
        self.identity = "fake-teacher"
        self.version: str | None = TEACHER_VERSION
        self.calls: list[list[str]] = []
        self.delay_s = 0.0
        self.fail = False
        self.gate: asyncio.Event | None = None

    def load(self) -> None:
        pass

    async def predict(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            raise ConnectionError("teacher replica died")
        return np.tile([-3.0, 3.0], (len(texts), 1))

    async def ready(self) -> bool:
        return not self.fail

    async def close(self) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind}


class RecordingMetrics:
    """The cascade's metrics sink: counts each call by name and keeps the last arguments."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.last: dict[str, tuple] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def record(*args: Any) -> None:
            self.counts[name] += 1
            self.last[name] = args

        return record


class ListWriter:
    """The queue writer's interface over a list; takes ``capacity`` records, then refuses (a full buffer)."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.records: list[Any] = []
        self.capacity = capacity
        self.written = self.dropped = self.retried = self.backlog = 0
        self.closed = False

    def submit(self, record: Any) -> bool:
        if len(self.records) >= self.capacity:
            self.dropped += 1
            return False
        self.records.append(record)
        self.written += 1
        return True

    def close(self) -> None:
        self.closed = True


def fake_bundle(version: str = "v1", threshold: float = 0.9) -> Bundle:
    """A bundle as the cascade reads it (manifest only; no files behind it)."""
    manifest = Manifest(version=version, created="2026-01-01T00:00:00Z", labels=["neg", "pos"], max_length=32,
                        temperatures=Temperatures(), threshold=threshold, files={})
    return Bundle(Path("/nonexistent") / version, manifest)


def publish_fake_bundle(home: Path, version: str, threshold: float = 0.9, promote: bool = True) -> str:
    """A published version with placeholder files (student, tokenizer, teacher weights), so ``Registry.load``
    and the swap run for real; made current unless ``promote`` is False."""
    staging = home / f"staging-{version}"
    (staging / "tokenizer").mkdir(parents=True)
    (staging / "teacher").mkdir()
    (staging / "student.onnx").write_bytes(f"student {version}".encode())
    (staging / "tokenizer" / "tokenizer.json").write_text("{}")
    (staging / "teacher" / "model.safetensors").write_bytes(b"teacher")
    manifest = {"labels": ["neg", "pos"], "max_length": 32, "temperatures": {}, "threshold": threshold}
    registry = Registry(home)
    registry.publish(staging, manifest, version=version)
    if promote:
        registry.current_file.write_text(version + "\n")
    return version


def open_fake_student(bundle: Bundle, threads: int) -> FakeStudent:
    """The cascade's ``open_student`` for a fake bundle: a fake student of that version."""
    return FakeStudent(version=bundle.version, threads=threads)


def make_cascade(fake_teacher: FakeTeacher | None = None, fake_student: FakeStudent | None = None,
                 clock: Any = None, writer: ListWriter | None = None, **settings: Any) -> Cascade:
    """A cascade on ``fake_bundle("v1")`` with live settings applied (shadow off unless given)."""
    config = GatewayConfig.model_validate({"shadow": {"share": 0.0}, **settings})
    kwargs = {} if clock is None else {"clock": clock}
    cascade = Cascade(fake_teacher or FakeTeacher(), RecordingMetrics(), open_writer=lambda url, config: writer,
                      **kwargs)
    cascade.snapshot = Snapshot(fake_bundle("v1"), fake_student or FakeStudent(), DeferralPolicy(threshold=0.9))
    cascade.configure(config)
    return cascade


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)
