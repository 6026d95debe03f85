"""The Serve application: ``serving.app:build_app`` for `serve run`, `serve deploy` and `cascade serve`.

Deployment options are chosen for a 2-core machine and can be overridden in the Serve config:

- Gateway: 2 replicas (one replica is one event loop and one ONNX Runtime thread: it leaves the
  second core idle), ``num_cpus`` 0.5 each (fractional, so both deployments fit on 2 cores),
  ``max_ongoing_requests`` 256 so Ray never becomes the bottleneck before our own admission limit
  (``limits.max_in_flight``), and ``max_queued_requests`` 512 so an overloaded cluster answers 503
  at once instead of queueing without bound.
- Teacher: 1 replica, ``num_cpus`` 0.5, ``max_ongoing_requests`` 32 (its batches are at most 16),
  and the CPU priority of Ray's own processes (niceness ``TEACHER_NICENESS``; Ray starts every other
  worker at niceness 15). On a shared node a deferred text is the request with the least slack: it has
  already waited for the student and then needs a model call several times longer, so when the teacher
  and the student path want the same core the teacher goes first. Ray applies the niceness when it
  starts the worker (``RAY_worker_niceness`` in the actor's runtime env, as Ray's job supervisor does),
  so no privilege is needed: the teacher is simply not lowered.

The options themselves (``DEPLOYMENT_OPTIONS``, ``AUTOSCALING``, ``TEACHER_NICENESS``) live in
``serving/deployment.py``, which the Gateway also reads without importing this module.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application

from serving.deployment import AUTOSCALING, DEPLOYMENT_OPTIONS, serve_deployment
from serving.gateway import Gateway
from serving.settings import GatewayConfig, ProcessLimits, TeacherDeploymentConfig
from serving.teacher import Teacher

APP_NAME = "cascade"

GatewayDeployment = serve.deployment(Gateway, name="Gateway", **DEPLOYMENT_OPTIONS["Gateway"])
TeacherDeployment = serve.deployment(Teacher, name="Teacher", **DEPLOYMENT_OPTIONS["Teacher"])


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args`` of the Serve config)."""

    config: GatewayConfig = Field(default_factory=GatewayConfig)
    teacher_threads: int = 1


def teacher_user_config(model: dict[str, Any]) -> dict[str, Any]:
    """The Teacher deployment's ``user_config`` (``TeacherDeploymentConfig``): the gateway's model, the defaults."""
    return {"model": dict(model), **TeacherDeploymentConfig().model_dump(mode="json", exclude={"model"})}


def default_serve_config(port: int = 8000, autoscale: bool = False) -> dict[str, Any]:
    """The Serve config `cascade serve` deploys; ``deploy/serve.yaml`` is this, written out.

    ``autoscale`` puts each deployment's ``AUTOSCALING`` config in place of its fixed ``num_replicas``.
    """
    gateway = GatewayConfig().model_dump(mode="json", exclude={"model": {"home"}})
    limits = ProcessLimits()

    def deployment(name: str, user_config: dict[str, Any]) -> dict[str, Any]:
        autoscaling = AUTOSCALING[name].model_copy(update={"enabled": autoscale})
        return serve_deployment(name, copy.deepcopy(DEPLOYMENT_OPTIONS[name]), autoscaling, user_config)

    return {
        "proxy_location": "EveryNode",
        # Serve ignores process_limits (an extra key); `cascade serve` and the chart turn it into HAProxy's
        # environment and these http_options (ProcessLimits).
        "process_limits": limits.model_dump(),
        "http_options": {"host": "0.0.0.0", "port": port, **limits.http_options()},
        "logging_config": {"enable_access_log": False, "log_level": "INFO"},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "serving.app:build_app",
            "args": {"teacher_threads": 1},
            "deployments": [
                deployment("Gateway", gateway),
                deployment("Teacher", teacher_user_config(gateway["model"])),
            ],
        }],
    }


def build_app(args: dict[str, Any] | None = None) -> Application:
    parsed = AppArgs.model_validate(args or {})
    model = parsed.config.model.model_dump()
    teacher = TeacherDeployment.options(user_config=teacher_user_config(model)).bind(model, parsed.teacher_threads)
    return GatewayDeployment.options(user_config=parsed.config.model_dump(mode="json")).bind(teacher)
