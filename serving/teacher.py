"""The teacher deployment: transformers on PyTorch, batched, with its own replicas and CPUs."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from ray import serve

from distill.registry import Registry
from serving.runtime import TeacherRuntime
from serving.settings import ModelSettings

logger = logging.getLogger("ray.serve")


class Teacher:
    """Loads the teacher of the served bundle; answers lists of texts with raw logits and its version."""

    def __init__(self, model: dict[str, Any] | None = None, threads: int = 1) -> None:
        self.threads = threads
        self.settings = ModelSettings.model_validate(model or {})
        self.version: str | None = None
        self.runtime: TeacherRuntime | None = None
        self._load(self.settings)

    def _load(self, settings: ModelSettings) -> None:
        bundle = Registry(settings.home).load(settings.version)
        if bundle.version == self.version:
            return
        self.runtime = TeacherRuntime(bundle.teacher_dir, bundle.tokenizer_dir, bundle.manifest.max_length,
                                      self.threads)
        self.version = bundle.version
        logger.info("teacher loaded bundle %s", self.version)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``{"model": {...}}``: follow a promotion without restarting the replica."""
        self.settings = ModelSettings.model_validate(user_config.get("model", {}))
        self._load(self.settings)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _logits(self, texts: list[str]) -> list[np.ndarray]:
        runtime = self.runtime
        assert runtime is not None
        # Blocking PyTorch work runs off the event loop so health checks and batching keep going.
        return list(await asyncio.to_thread(runtime.logits, texts))

    async def classify(self, texts: list[str]) -> dict[str, Any]:
        version = self.version
        rows = await asyncio.gather(*(self._logits(text) for text in texts))
        return {"version": version, "logits": np.stack(rows).tolist()}

    async def ready(self) -> str | None:
        return self.version
