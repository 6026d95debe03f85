"""The teacher deployment: transformers on PyTorch, batched, with its own replicas and CPUs."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import numpy as np

from bundle.registry import Registry
from bundle.runtime import TeacherRuntime
from serving.batching import OpportunisticBatcher
from serving.metrics import ModelCallMetrics
from serving.settings import ModelSettings, TeacherBatchSettings, TeacherDeploymentConfig

logger = logging.getLogger("ray.serve")


class Teacher:
    """Loads the teacher of the served bundle; answers lists of texts with raw logits and its version."""

    def __init__(self, model: dict[str, Any] | None = None, threads: int = 1) -> None:
        self.threads = threads
        self.settings = ModelSettings.model_validate(model or {})
        self.version: str | None = None
        self.runtime: TeacherRuntime | None = None
        self.metrics = ModelCallMetrics("teacher")
        defaults = TeacherBatchSettings()
        self._batcher = OpportunisticBatcher(self._run_batch, defaults.max_batch_size, defaults.batch_wait_timeout_s)
        self._load(self.settings)
        threading.Thread(target=self._follow_current, name="cascade-follow-current", daemon=True).start()

    def _load(self, settings: ModelSettings) -> None:
        """Load the bundle's teacher unless it is the one already loaded (re-distilled bundles share it)."""
        registry = Registry(settings.home)
        if registry.load(settings.version, verify=False).teacher_version == self.version:
            return
        bundle = registry.load(settings.version)
        self.runtime = TeacherRuntime(bundle.teacher_dir, bundle.tokenizer_dir, bundle.manifest.max_length,
                                      self.threads)
        self.version = bundle.teacher_version
        logger.info("teacher loaded from bundle %s (teacher %s)", bundle.version, self.version)

    def _follow_current(self) -> None:
        while True:
            time.sleep(self.settings.poll_interval_s)
            if self.settings.version is None:
                try:
                    self._load(self.settings)
                except Exception as exc:  # keep serving the loaded teacher
                    logger.error("teacher not reloaded: %s", exc)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``TeacherDeploymentConfig``: follow a promotion, change batching; no restart."""
        config = TeacherDeploymentConfig.model_validate(user_config)
        self._batcher.max_batch_size = config.batch.max_batch_size
        self._batcher.wait_s = config.batch.batch_wait_timeout_s
        self.settings = config.model
        self._load(self.settings)

    async def _run_batch(self, texts: list[str]) -> list[np.ndarray]:
        runtime = self.runtime
        assert runtime is not None
        # Blocking PyTorch work runs off the event loop so health checks and batching keep going.
        started = time.perf_counter()
        logits = await asyncio.to_thread(runtime.logits, texts)
        self.metrics.call(len(texts), time.perf_counter() - started)
        return list(logits)

    async def classify(self, texts: list[str]) -> dict[str, Any]:
        version = self.version
        rows = await asyncio.gather(*(self._batcher(text) for text in texts))
        return {"version": version, "logits": np.stack(rows).tolist()}

    async def ready(self) -> str | None:
        return self.version
