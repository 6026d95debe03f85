"""Serve deployment options: the defaults of each deployment and what the Helm values and their schema say.

``DEPLOYMENT_OPTIONS`` and ``AUTOSCALING`` are the defaults (``serving/app.py`` builds the deployments and
the Serve config from them; the Gateway reads its own ``max_ongoing_requests`` here outside a replica). The
models give them types, bounds and descriptions, so the chart's values schema is generated from them instead
of written by hand (``serving/generate.py``). Field names are Serve's own, so a deployment's values are its
Serve config. This module imports neither Ray nor the deployments, so both ``serving/app.py`` and
``serving/gateway.py`` can import it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serving.settings import GatewayConfig, TeacherDeploymentConfig


class AutoscalingSettings(BaseModel):
    """Serve's ``autoscaling_config``; when enabled it replaces the fixed ``num_replicas``.

    Off by default: on the 2-core machine the project is built for, one more replica only adds contention.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Scale on ongoing requests instead of a fixed num_replicas.")
    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 scales to zero; the first request waits).")
    max_replicas: int = Field(4, ge=1, description="Most replicas; each needs its ray_actor_options free.")
    target_ongoing_requests: float = Field(16.0, gt=0, description="Requests in flight per replica that "
                                           "Serve aims for (adds a replica above, removes one below).")
    upscale_delay_s: float = Field(30.0, ge=0, description="How long load must stay above target before scaling up.")
    downscale_delay_s: float = Field(300.0, ge=0, description="How long load must stay below target before "
                                     "scaling down.")

    def serve_config(self) -> dict[str, Any]:
        """The ``autoscaling_config`` block of a Serve deployment config."""
        return self.model_dump(exclude={"enabled"})


class RayActorOptions(BaseModel):
    """Resources each replica reserves in Ray (its placement: CPUs, GPUs, custom node resources)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float | None = Field(None, ge=0, description="CPUs reserved per replica (fractions share a core).")
    num_gpus: float | None = Field(None, ge=0, description="GPUs reserved per replica; the Teacher on a GPU "
                                   "node sets 1 (and user_config.device).")
    memory: float | None = Field(None, ge=0, description="Bytes of memory reserved per replica.")
    resources: dict[str, float] | None = Field(None, description="Custom Ray resources, e.g. {teacher: 1} to pin "
                                               "replicas to nodes started with that resource.")
    runtime_env: dict[str, Any] | None = Field(None, description="Ray runtime_env (env_vars, ...).")


class DeploymentValues(BaseModel):
    """One Serve deployment's options (Serve's field names) plus the autoscaling switch."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="Fixed replica count (ignored when autoscaling.enabled).")
    max_ongoing_requests: int = Field(..., ge=1, description="Requests Serve sends one replica at once.")
    max_queued_requests: int = Field(..., ge=-1, description="Requests queued at callers before 503s (-1: no "
                                     "limit).")
    health_check_period_s: float = Field(..., gt=0)
    ray_actor_options: RayActorOptions = Field(default_factory=RayActorOptions)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)


class GatewayValues(DeploymentValues):
    """The Gateway deployment; ``user_config`` is ``GatewayConfig`` (applied live, no restart)."""

    user_config: GatewayConfig = Field(default_factory=GatewayConfig)


class TeacherValues(DeploymentValues):
    """The Teacher deployment; ``user_config`` is ``TeacherDeploymentConfig`` (its model follows the Gateway's)."""

    user_config: TeacherDeploymentConfig = Field(default_factory=TeacherDeploymentConfig)


TEACHER_NICENESS = 0

# One source for each deployment's options: used for the deployments of serving/app.py and written into the
# Serve config (deploy/serve.yaml) by its ``default_serve_config``.
DEPLOYMENT_OPTIONS: dict[str, dict[str, Any]] = {
    "Gateway": {"num_replicas": 2, "max_ongoing_requests": 256, "max_queued_requests": 512,
                "ray_actor_options": {"num_cpus": 0.5}, "health_check_period_s": 5},
    "Teacher": {"num_replicas": 1, "max_ongoing_requests": 32, "max_queued_requests": 64,
                "ray_actor_options": {"num_cpus": 0.5,
                                      "runtime_env": {"env_vars": {"RAY_worker_niceness": str(TEACHER_NICENESS)}}},
                "health_check_period_s": 5},
}

# Serve autoscaling per deployment, off by default (on 2 cores another replica only adds contention):
# `cascade serve --autoscale`, `cascade serve-config --autoscale` or the chart's serve.<name>.autoscaling.enabled.
AUTOSCALING: dict[str, AutoscalingSettings] = {
    "Gateway": AutoscalingSettings(min_replicas=1, max_replicas=4, target_ongoing_requests=16.0),
    "Teacher": AutoscalingSettings(min_replicas=1, max_replicas=4, target_ongoing_requests=8.0),
}


def serve_deployment(name: str, options: dict[str, Any], autoscaling: AutoscalingSettings,
                     user_config: dict[str, Any]) -> dict[str, Any]:
    """A deployment of the Serve config: fixed replicas, or ``autoscaling_config`` in their place."""
    deployment = {"name": name, **options}
    if autoscaling.enabled:
        deployment.pop("num_replicas", None)
        deployment["autoscaling_config"] = autoscaling.serve_config()
    return deployment | {"user_config": user_config}
