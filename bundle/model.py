"""One model interface for the student and every teacher kind: load, predict logits, ready, close.

Like KServe's and MLServer's model classes: the cascade, the Teacher deployment, evaluation and
re-distillation hold a ``Model`` and never ask which runtime is behind it. Runtimes register by kind
(``@register("student-onnx")``) and are opened with ``open_model(kind, ...)``, which loads them.

No Ray, serving or training imports here (import-linter contract of ``bundle``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from bundle.registry import Bundle


@runtime_checkable
class Model(Protocol):
    """What the cascade asks of any model: raw logits in the bundle's label order, and its state."""

    kind: str
    labels: list[str]
    identity: str  # what produced the answers, for caches of them
    version: str | None  # of the answers it gives now (a teacher behind a server may swap)

    def load(self) -> None:
        """Open sessions, weights or connection settings; called once by ``open_model``."""

    async def predict(self, texts: list[str]) -> np.ndarray:
        """Raw logits, one row per text; blocking work runs off the caller's event loop."""

    async def ready(self) -> bool:
        """Whether it can answer now (a remote server's own readiness); never raises."""

    async def close(self) -> None:
        """Release connections and threads; calls in flight finish first."""

    def state(self) -> dict[str, Any]:
        """Kind and runtime details for status and readiness answers."""


ModelClass = TypeVar("ModelClass", bound=type)
MODEL_KINDS: dict[str, type] = {}


def register(kind: str) -> Callable[[ModelClass], ModelClass]:
    """Class decorator: make a runtime openable by ``open_model(kind)``."""

    def add(cls: ModelClass) -> ModelClass:
        if kind in MODEL_KINDS and MODEL_KINDS[kind] is not cls:
            raise ValueError(f"model kind {kind!r} is already registered to {MODEL_KINDS[kind].__name__}")
        MODEL_KINDS[kind] = cls
        cls.kind = kind
        return cls

    return add


def open_model(kind: str, *args: Any, **kwargs: Any) -> Model:
    """Construct and load the runtime registered as ``kind``."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; kinds: {sorted(MODEL_KINDS)}")
    model = MODEL_KINDS[kind](*args, **kwargs)
    model.load()
    return model


class ThreadedModel:
    """Base of the in-process runtimes: ``run`` blocks (ONNX Runtime, PyTorch), ``predict`` moves it to one
    worker thread of the model's own, so the event loop keeps accepting (and filling the next batch).

    The thread starts on the first call after ``load`` or ``close``: offline callers run one event loop per
    call and close the model after each, and the weights stay loaded between them.
    """

    kind = "threaded"
    labels: list[str]
    identity: str = ""
    version: str | None = None
    loaded = False

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None

    def load(self) -> None:
        self.loaded = True

    def run(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    async def predict(self, texts: list[str]) -> np.ndarray:
        if not self.loaded:
            raise RuntimeError(f"{self.kind} model used before load()")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.kind)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.run, texts)

    async def ready(self) -> bool:
        return self.loaded

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self._executor = None

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind}


@register("student-onnx")
class OnnxStudent(ThreadedModel):
    """The bundle's int8 student on ONNX Runtime (``bundle.runtime.StudentRuntime``)."""

    def __init__(self, bundle: Bundle, threads: int = 1) -> None:
        super().__init__()
        self.bundle, self.threads = bundle, threads
        self.labels, self.version = list(bundle.manifest.labels), bundle.version
        self.identity = f"student:{bundle.version}"
        self.runtime: Any = None

    def load(self) -> None:
        from bundle.runtime import StudentRuntime

        self.runtime = StudentRuntime(Path(self.bundle.student_path), Path(self.bundle.tokenizer_dir),
                                      self.bundle.manifest.max_length, self.threads)
        super().load()

    def run(self, texts: list[str]) -> np.ndarray:
        return self.runtime.logits(texts)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version, "threads": self.threads}
