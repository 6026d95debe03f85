"""The teacher replica's life without Ray: the bundle's teacher, in this process (CPU or GPU) or on a server.

Its kind comes from the bundle's manifest (``Manifest.teacher``): ``local`` runs the bundle's teacher/
weights on transformers (``runtime.device``: cpu, cuda or auto; the Serve config's
``ray_actor_options.num_gpus`` places the replica on a GPU node); ``remote`` calls an Open Inference
Protocol v2 server through ``bundle.teachers.RemoteTeacher`` (pooled, time-limited, retried, with a circuit
breaker, so while the server is down a deferred text fails at once and the gateway answers it degraded).
The gateway's contract is the same for both: ``predict`` returns the teacher version and raw logits. The
Serve deployment (serving/teacher.py) is a thin adapter over ``TeacherHost``; an import-linter contract keeps
this module free of Ray.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Protocol

import numpy as np

from bundle.model import Model
from bundle.registry import TEACHER_FILES, Bundle, Registry
from bundle.teachers import open_teacher
from routing.breaker import CircuitBreaker
from serving.batching import OpportunisticBatcher
from serving.settings import ModelSettings, TeacherBatchSettings, TeacherDeploymentConfig, TeacherRuntimeSettings

logger = logging.getLogger("ray.serve")


class ModelCallSink(Protocol):
    def call(self, size: int, seconds: float) -> None: ...


class TeacherHost:
    """Opens the teacher of the served bundle, follows promotions, batches calls; answers lists of texts with
    raw logits and the teacher version."""

    def __init__(self, metrics: ModelCallSink, model: dict[str, Any] | None = None, threads: int = 1) -> None:
        self.threads = threads
        self.settings = ModelSettings.model_validate(model or {})
        self.runtime_settings = TeacherRuntimeSettings()
        self.version: str | None = None
        self.client: Model | None = None
        self._loaded_key: tuple[Any, ...] | None = None
        self._lock = threading.Lock()
        self.metrics = metrics
        defaults = TeacherBatchSettings()
        self._batcher = OpportunisticBatcher(self._run_batch, defaults.max_batch_size, defaults.batch_wait_timeout_s)
        self._load(self.settings, self.runtime_settings)

    def start(self) -> threading.Thread:
        """Follow promotions on a thread of its own (opening a new teacher never holds the event loop)."""
        thread = threading.Thread(target=self._follow_current, name="cascade-follow-current", daemon=True)
        thread.start()
        return thread

    def _load(self, settings: ModelSettings, runtime: TeacherRuntimeSettings) -> None:
        """Open the bundle's teacher unless the same one is open (re-distilled bundles share their teacher)."""
        with self._lock:
            registry = Registry(settings.home)
            bundle = registry.load(settings.version, verify=False)
            key = (bundle.teacher_version, bundle.manifest.teacher.model_dump_json(), runtime.model_dump_json(),
                   self.threads)
            if key == self._loaded_key:
                return
            bundle = registry.load(settings.version, verify=TEACHER_FILES)
            old, self.client = self.client, self._open(bundle, runtime)
            self.version, self._loaded_key = bundle.teacher_version, key
        logger.info("teacher (%s) opened from bundle %s (teacher %s)", bundle.manifest.teacher.kind, bundle.version,
                    self.version)
        if old is not None:
            self._close_later(old)

    def _open(self, bundle: Bundle, runtime: TeacherRuntimeSettings) -> Model:
        manifest = bundle.manifest
        remote = manifest.teacher.remote
        breaker = None if remote is None else CircuitBreaker(remote.breaker_failures, remote.breaker_reset_s)
        return open_teacher(manifest.teacher, bundle.path, manifest.labels, max_length=manifest.max_length,
                            threads=self.threads, device=runtime.device, remote_url=runtime.remote_url,
                            breaker=breaker, runtime=runtime.engine, version=bundle.teacher_version)

    @staticmethod
    def _close_later(client: Model) -> None:
        """A replaced remote client's pool belongs to the replica's event loop; calls in flight finish first."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # opened on another thread: its connections close with the loop's garbage
        loop.call_later(30.0, lambda: loop.create_task(client.close()))

    def _follow_current(self) -> None:
        while True:
            time.sleep(self.settings.poll_interval_s)
            self.beat()

    def beat(self) -> None:
        """Open the registry's current teacher if it changed; a bad one keeps the loaded teacher."""
        if self.settings.version is None:
            try:
                self._load(self.settings, self.runtime_settings)
            except Exception as exc:
                logger.error("teacher not reloaded: %s", exc)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``TeacherDeploymentConfig``: follow a promotion, move device or server, change batching; no restart."""
        config = TeacherDeploymentConfig.model_validate(user_config)
        self._batcher.max_batch_size = config.batch.max_batch_size
        self._batcher.wait_s = config.batch.batch_wait_timeout_s
        self.settings, self.runtime_settings = config.model, config.runtime
        self._load(self.settings, self.runtime_settings)

    async def _run_batch(self, texts: list[str]) -> list[np.ndarray]:
        client = self.client
        assert client is not None
        # A local teacher's PyTorch work runs on a worker thread; a remote one awaits HTTP: either way the event
        # loop keeps batching and answering health checks.
        started = time.perf_counter()
        logits = await client.predict(texts)
        self.metrics.call(len(texts), time.perf_counter() - started)
        return list(logits)

    async def predict(self, texts: list[str]) -> dict[str, Any]:
        """Raw logits in the bundle's label order, and the teacher version that gave them."""
        version = self.version
        rows = await asyncio.gather(*(self._batcher(text) for text in texts))
        # An ndarray crosses the handle as one buffer (Ray serialises numpy without per-element objects).
        return {"version": version, "logits": np.stack(rows)}

    async def state(self) -> dict[str, Any]:
        """For the gateway's readiness answer: the teacher's kind, version and, for a remote one, whether the
        server says its model is ready and the circuit breaker's state."""
        client = self.client
        if client is None:
            return {"version": None, "ready": False}
        return {"version": self.version, "ready": await client.ready(), **client.state()}

