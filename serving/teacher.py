"""The Teacher deployment on Ray Serve: a thin adapter over ``serving.teacher_host.TeacherHost``, and the
gateway's view of it through a Serve handle (``ServeTeacher``, a ``bundle.model.Model``).

Its kind comes from the bundle's manifest (``Manifest.teacher``): ``local`` runs the bundle's teacher/ weights
(``runtime.device``: cpu, cuda or auto; the Serve config's ``ray_actor_options.num_gpus`` places the replica
on a GPU node); ``remote`` calls an Open Inference Protocol v2 server (pooled, time-limited, retried, with a
circuit breaker, so while the server is down a deferred text fails at once and the gateway answers it
degraded).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.metrics import ModelCallMetrics
from serving.teacher_host import TeacherHost


class Teacher:
    """Serve deployment: the host's answers, its readiness state, and live reconfiguration."""

    def __init__(self, model: dict[str, Any] | None = None, threads: int = 1) -> None:
        self.host = TeacherHost(ModelCallMetrics("teacher"), model, threads)
        self.host.start()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``TeacherDeploymentConfig``: follow a promotion, move device or server, change batching; no restart."""
        self.host.reconfigure(user_config)

    async def predict(self, texts: list[str]) -> dict[str, Any]:
        """Raw logits in the bundle's label order (one numpy array across the handle), and the teacher version."""
        return await self.host.predict(texts)

    async def state(self) -> dict[str, Any]:
        """For the gateway's readiness answer: kind, version and, for a remote teacher, the server's readiness and
        the breaker's state."""
        return await self.host.state()


class ServeTeacher:
    """The Teacher deployment, seen from the gateway through its Serve handle, as a ``bundle.model.Model``."""

    kind = "serve"

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.labels: list[str] = []
        self.identity = "serve:Teacher"
        self.version: str | None = None

    def load(self) -> None:
        """The deployment loads its own teacher."""

    async def predict(self, texts: list[str]) -> np.ndarray:
        answer = await self.handle.predict.remote(texts)
        self.version = answer["version"]
        return np.asarray(answer["logits"], dtype=np.float64)

    async def ready(self) -> bool:
        return bool((await self.handle.state.remote()).get("ready"))

    async def close(self) -> None:
        """The handle belongs to Serve."""

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": self.version}
