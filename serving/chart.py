"""The Helm chart's values as one typed model: the source of helm/cascade/values.yaml and values.schema.json.

The ``serve`` part is the Serve config of ``serving/app.py`` (Serve's own field names, the settings models
for ``user_config``); the rest are the values only Kubernetes needs (image, volumes, queue backend, Ray pods,
the GPU group, the models Job), written here once. ``serving/generate.py`` writes the files from it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from serving.deployment import GatewayValues, TeacherValues
from serving.settings import ProcessLimits

QUANTITY = r"^[0-9]+(Mi|Gi|Ti)$"


class ChartModel(BaseModel):
    """Chart-only values: camelCase keys as Helm charts spell them; unknown keys are refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Resources(ChartModel):
    """A container's Kubernetes resources."""

    requests: dict[str, str | int] = Field(default_factory=dict)
    limits: dict[str, str | int] = Field(default_factory=dict)


def _resources(cpu: str, memory: str) -> Resources:
    return Resources(requests={"cpu": cpu, "memory": memory}, limits={"cpu": cpu, "memory": memory})


class Image(ChartModel):
    repository: str = Field("ghcr.io/cascade-gateway/cascade", min_length=1,
                            description="Built from deploy/Dockerfile (Ray base image, the project, no weights).")
    tag: str = Field("", description="Default: the chart's appVersion.")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class ApiKey(ChartModel):
    """The key clients send as "Authorization: Bearer ..."."""

    existing_secret: str = Field("", description="A Secret with key api-key; empty: the chart creates one.")
    value: str = Field("", description="The key for the chart's Secret (random when empty, kept across upgrades).")


class ModelsPvc(ChartModel):
    existing_claim: str = Field("", description="A volume already holding registry/; empty: the chart makes one.")
    size: str = Field("5Gi", pattern=QUANTITY)
    storage_class: str = ""
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod"]] = Field(
        default_factory=lambda: ["ReadWriteMany"], min_length=1,
        description="ReadWriteMany: the head, the workers, the models Job and the CronJob share it.")


class ModelsS3(ChartModel):
    url: str = Field("", pattern=r"^(s3://.+)?$", description="s3://bucket/prefix/registry")
    endpoint: str = Field("", description="For S3-compatible stores (MinIO, Ceph, R2).")
    credentials_secret: str = Field("", description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.")
    image: str = "amazon/aws-cli:2.17.0"


class ModelsBuild(ChartModel):
    """The models Job: `cascade build --if-missing` into the models volume (Ray pods wait for it)."""

    image: str = Field("", description="An image with what `cascade build` needs (deploy/Dockerfile built with "
                       "--build-arg WITH_BUILD_DEPS=1: make image-builder); the serving image holds no base model "
                       "or data. Empty: the serving image's repository and tag with -builder appended.")
    args: list[str] = Field(default_factory=list, description="Extra `cascade build` arguments, e.g. [--tiny].")
    offline: bool = Field(False, description="Set HF_HUB_OFFLINE: only when the base models are in the volume.")
    resources: Resources = Field(default_factory=lambda: _resources("2", "6Gi"))


class Models(ChartModel):
    """Where the model bundle (the registry: teacher, int8 student, manifest) comes from."""

    source: Literal["pvc", "s3", "build"] = Field(
        "pvc", description="pvc: the volume already holds registry/; s3: an init container syncs models.s3.url "
        "into it; build: a Job runs `cascade build --if-missing` into it.")
    pvc: ModelsPvc = Field(default_factory=ModelsPvc)
    s3: ModelsS3 = Field(default_factory=ModelsS3)
    build: ModelsBuild = Field(default_factory=ModelsBuild)


class SqliteQueue(ChartModel):
    size: str = Field("1Gi", pattern=QUANTITY)
    storage_class: str = ""


class RedisQueue(ChartModel):
    url: str = Field("", pattern=r"^(rediss?://.+)?$", description="An existing Redis; ignored when deploy is true.")
    deploy: bool = Field(False, description="Run a small Redis in the release.")
    image: str = "redis:7.2-alpine"


class Queue(ChartModel):
    """The distillation queue: SQLite on one node's volume, or Redis Streams for several nodes."""

    backend: Literal["sqlite", "redis"] = Field("sqlite", description="sqlite holds one Ray node (the schema "
                                                "refuses it with workers); redis for several.")
    sqlite: SqliteQueue = Field(default_factory=SqliteQueue)
    redis: RedisQueue = Field(default_factory=RedisQueue)


class HttpOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)


class Application(BaseModel):
    """The Serve application (name, route, import path, ``build_app`` args)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    route_prefix: str
    import_path: str
    args: dict[str, Any] = Field(default_factory=dict)


class Serve(ChartModel):
    """The Serve config (serveConfigV2), in Serve's field names: defaults equal deploy/serve.yaml."""

    fast_path: bool = Field(True, description="HAProxy ingress + throughput-optimised Serve (docs/performance.md).")
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = Field("EveryNode", alias="proxy_location")
    http_options: HttpOptions = Field(default_factory=HttpOptions, alias="http_options")
    process_limits: ProcessLimits = Field(default_factory=ProcessLimits, alias="process_limits", description="Limits "
                                          "that protect HAProxy and the replicas (serving/settings.py "
                                          "ProcessLimits): set as the Ray pods' RAY_SERVE_HAPROXY_* environment "
                                          "and http_options' timeouts, read when Ray starts. KubeRay makes a new "
                                          "cluster when the pods' environment changes (every field but "
                                          "keep_alive_timeout_s, which takes effect with the next new cluster).")
    logging_config: dict[str, Any] = Field(default_factory=dict, alias="logging_config")
    application: Application
    gateway: GatewayValues
    teacher: TeacherValues


class WorkerGroup(ChartModel):
    """A Ray worker group (more Ray nodes); any worker needs queue.backend redis."""

    replicas: int = Field(0, ge=0)
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(0, ge=0, description="Above replicas only with ray.autoscaling.")
    resources: Resources = Field(default_factory=lambda: _resources("2", "4Gi"))
    ray_resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources of these "
                                            "nodes (rayStartParams resources), e.g. {teacher: 1}.")


class GpuWorkerGroup(WorkerGroup):
    """GPU nodes for the Teacher: set serve.teacher.ray_actor_options.num_gpus and user_config.device too."""

    enabled: bool = Field(False, description="Add the GPU worker group.")
    replicas: int = Field(1, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=0)
    gpus: int = Field(1, ge=1, description="nvidia.com/gpu per node (limits; Ray counts them as num-gpus).")
    resources: Resources = Field(default_factory=lambda: _resources("4", "16Gi"))
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"},
                                          description="Where the GPU nodes are (here: NVIDIA GPU feature discovery).")
    tolerations: list[dict[str, Any]] = Field(default_factory=lambda: [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])


class HeadGroup(ChartModel):
    resources: Resources = Field(default_factory=lambda: _resources("2", "4Gi"))


class Ray(ChartModel):
    version: str = "2.60.0"
    metrics_port: int = Field(8080, ge=1, le=65535)
    autoscaling: bool = Field(False, description="KubeRay's in-tree autoscaler: worker pods between min and max.")
    head: HeadGroup = Field(default_factory=HeadGroup)
    workers: WorkerGroup = Field(default_factory=WorkerGroup)
    gpu_workers: GpuWorkerGroup = Field(default_factory=GpuWorkerGroup)


class Redistill(ChartModel):
    """`cascade distill --from-queue` on a schedule; promotes a student that passes the gate."""

    enabled: bool = True
    schedule: str = Field("0 */6 * * *", min_length=9)
    epochs: int = Field(2, ge=1, le=20)
    resources: Resources = Field(default_factory=lambda: Resources(requests={"cpu": "2", "memory": "6Gi"},
                                                                   limits={"cpu": "4", "memory": "8Gi"}))


class Monitor(ChartModel):
    enabled: bool = Field(False, description="Needs the Prometheus operator's CRDs.")
    interval: str = Field("15s", pattern=r"^[0-9]+(ms|s|m|h)$")


class Toggle(ChartModel):
    enabled: bool = False


class Metrics(ChartModel):
    service_monitor: Monitor = Field(default_factory=Monitor)
    pod_monitor: Monitor = Field(default_factory=Monitor)
    prometheus_rule: Toggle = Field(default_factory=Toggle)


class Service(ChartModel):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(8000, ge=1, le=65535)


class Ingress(ChartModel):
    enabled: bool = False
    class_name: str = ""
    host: str = "cascade.example.com"
    annotations: dict[str, str] = Field(default_factory=dict)
    tls: list[dict[str, Any]] = Field(default_factory=list)


class NetworkPolicy(ChartModel):
    enabled: bool = True
    allow_from: list[dict[str, Any]] = Field(default_factory=list, description="Who may call the gateway port; "
                                             "empty: any pod in the namespace.")
    prometheus_namespace_selector: dict[str, Any] = Field(default_factory=dict, description="Where Prometheus "
                                                          "runs, for the metrics port.")


class PodDisruptionBudget(ChartModel):
    enabled: bool = True
    max_unavailable: int | str = 1


class SecurityContext(ChartModel):
    run_as_user: int = Field(1000, ge=1)
    run_as_group: int = Field(100, ge=1)
    read_only_root_filesystem: bool = Field(False, description="Ray writes session files under its install dir.")


class Tests(ChartModel):
    """The `helm test` pod: classifies one text through the Service."""

    text: str = "a warm, funny and beautifully acted film"


class ChartValues(ChartModel):
    """Every value of helm/cascade (values.yaml holds the defaults, values.schema.json the types)."""

    image: Image = Field(default_factory=Image)
    image_pull_secrets: list[dict[str, str]] = Field(default_factory=list)
    api_key: ApiKey = Field(default_factory=ApiKey)
    models: Models = Field(default_factory=Models)
    queue: Queue = Field(default_factory=Queue)
    serve: Serve
    ray: Ray = Field(default_factory=Ray)
    redistill: Redistill = Field(default_factory=Redistill)
    metrics: Metrics = Field(default_factory=Metrics)
    service: Service = Field(default_factory=Service)
    ingress: Ingress = Field(default_factory=Ingress)
    network_policy: NetworkPolicy = Field(default_factory=NetworkPolicy)
    pod_disruption_budget: PodDisruptionBudget = Field(default_factory=PodDisruptionBudget)
    security_context: SecurityContext = Field(default_factory=SecurityContext)
    tests: Tests = Field(default_factory=Tests)
    node_selector: dict[str, str] = Field(default_factory=dict, description="For the head and CPU worker pods.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
