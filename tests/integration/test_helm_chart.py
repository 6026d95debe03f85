"""The Helm chart, rendered and validated with no cluster: helm lint and template, kubernetes-validate
--strict on core resources, and the CRD schemas (KubeRay, prometheus-operator) for the rest."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serving.app import AUTOSCALING
from serving.generate import SQLITE_ONE_NODE
from serving.settings import TeacherDeploymentConfig

pytestmark = pytest.mark.integration  # runs helm and kubernetes-validate in subprocesses

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cascade"
HELM = ROOT / ".tools" / "helm"
KUBERNETES_VALIDATE = str(Path(sys.executable).with_name("kubernetes-validate"))  # the venv's, PATH or not
SHARED = ROOT.parent / "shared"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
CRDS = {
    "RayService": SHARED / "kuberay" / "ray.io_rayservices.yaml",
    "ServiceMonitor": SHARED / "prometheus-operator" / "monitoring.coreos.com_servicemonitors.yaml",
    "PodMonitor": SHARED / "prometheus-operator" / "monitoring.coreos.com_podmonitors.yaml",
    "PrometheusRule": SHARED / "prometheus-operator" / "monitoring.coreos.com_prometheusrules.yaml",
}


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.is_file():
        pytest.fail("helm not found: `make .tools/helm` (part of `make test`) fetches it")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)


def render(values: Path | None = None, *sets: str, json_sets: tuple[str, ...] | list[str] = ()) -> list[dict]:
    args = ["template", "demo", str(CHART), "--namespace", "cascade"]
    if values:
        args += ["-f", str(values)]
    for item in sets:
        args += ["--set", item]
    for item in json_sets:
        args += ["--set-json", item]
    result = helm(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def crd_schema(path: Path, version: str) -> dict:
    crd = yaml.safe_load(path.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def validate_crd(doc: dict) -> None:
    """The CRD's OpenAPI schema as JSON Schema (its Go-syntax patterns are not checked as Python regexes)."""
    schema = crd_schema(CRDS[doc["kind"]], doc["apiVersion"].split("/")[1])
    jsonschema.validators.validator_for(schema)(schema).validate(doc)


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.name if v else "defaults")
def test_chart_lints_renders_and_validates(values: Path | None, tmp_path: Path) -> None:
    lint = helm("lint", str(CHART), *(["-f", str(values)] if values else []))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    documents = render(values)
    kinds = {doc["kind"] for doc in documents}
    assert {"RayService", "Service", "NetworkPolicy", "PodDisruptionBudget", "CronJob"} <= kinds
    core = [doc for doc in documents if doc["kind"] not in CRDS]
    manifest = tmp_path / "core.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    checked = subprocess.run([KUBERNETES_VALIDATE, "--strict", "--quiet", str(manifest)], capture_output=True,
                             text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for doc in documents:
        if doc["kind"] in CRDS:
            validate_crd(doc)


def test_monitoring_resources_render_when_enabled() -> None:
    example = CHART / "examples" / "redis-s3-ingress.yaml"
    kinds = [doc["kind"] for doc in render(example)]
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "Ingress", "Deployment"} <= set(kinds)
    rule = next(doc for doc in render(example) if doc["kind"] == "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())


def test_a_wrong_type_is_refused_by_the_values_schema() -> None:
    result = helm("template", "demo", str(CHART), "--set", "serve.http_options.port=eighty")
    assert result.returncode != 0
    assert "/serve/http_options/port" in result.stderr and "want integer" in result.stderr
    bad_backend = helm("template", "demo", str(CHART), "--set", "queue.backend=kafka")
    assert bad_backend.returncode != 0 and "/queue/backend" in bad_backend.stderr


def test_crd_validation_catches_a_broken_rayservice() -> None:
    service = next(doc for doc in render(CHART / "examples" / "multinode-redis.yaml") if doc["kind"] == "RayService")
    validate_crd(service)
    broken = copy.deepcopy(service)
    del broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(broken)


def rayservice(documents: list[dict]) -> dict:
    return next(doc for doc in documents if doc["kind"] == "RayService")


def serve_deployments(documents: list[dict]) -> dict[str, dict]:
    config = yaml.safe_load(rayservice(documents)["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # what KubeRay hands to Serve, checked by Serve's own schema
    return {d["name"]: d for d in config["applications"][0]["deployments"]}


def test_serve_config_in_the_rayservice_is_deploy_serve_yaml() -> None:
    """Same application config as deploy/serve.yaml; the chart sets only the queue URL on purpose."""
    rendered = yaml.safe_load(rayservice(render())["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    gateway = next(d for d in rendered["applications"][0]["deployments"] if d["name"] == "Gateway")
    assert gateway["user_config"]["queue"]["url"] == "sqlite:////data/queue/queue.db"
    gateway["user_config"]["queue"]["url"] = None  # deploy/serve.yaml: SQLite beside the models
    assert rendered == shipped


def test_values_change_the_serve_config_and_the_queue() -> None:
    documents = render(None, "queue.backend=redis", "queue.redis.deploy=true", "serve.teacher.num_replicas=3",
                       json_sets=["serve.gateway.user_config.routing.threshold=0.8",
                                  "serve.gateway.user_config.model.version=\"v7\"",
                                  "serve.teacher.ray_actor_options.runtime_env.env_vars.RAY_worker_niceness=\"10\""])
    deployments = serve_deployments(documents)
    assert deployments["Gateway"]["user_config"]["routing"]["threshold"] == 0.8
    assert deployments["Gateway"]["user_config"]["queue"]["url"] == "redis://demo-cascade-redis:6379/0"
    assert deployments["Teacher"]["user_config"]["model"]["version"] == "v7"  # the Teacher follows the Gateway
    assert deployments["Teacher"]["num_replicas"] == 3
    assert deployments["Teacher"]["ray_actor_options"]["runtime_env"]["env_vars"]["RAY_worker_niceness"] == "10"
    assert "PersistentVolumeClaim" in {d["kind"] for d in documents}  # the models volume
    assert not any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"].endswith("-queue")
                   for d in documents)


def test_a_typo_in_a_user_config_field_is_refused() -> None:
    """The schema comes from GatewayConfig, so an unknown field fails at `helm template`, not in the replica."""
    result = helm("template", "demo", str(CHART), "--set-json", "serve.gateway.user_config.teacher.max_shar=0.2")
    assert result.returncode != 0 and "max_shar" in result.stderr
    result = helm("template", "demo", str(CHART), "--set-json", "serve.gateway.user_config.teacher.max_share=2")
    assert result.returncode != 0 and "/serve/gateway/user_config/teacher/max_share" in result.stderr


def test_sqlite_with_several_nodes_is_refused_with_the_reason() -> None:
    refused = CHART / "refused" / "sqlite-multinode.yaml"
    for command in ("lint", "template"):
        result = helm(command, *(["demo"] if command == "template" else []), str(CHART), "-f", str(refused))
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert SQLITE_ONE_NODE in output.replace("\\'", "'") and "/queue/backend" in output
    autoscaled = helm("template", "demo", str(CHART), "--set", "ray.workers.maxReplicas=3")
    assert autoscaled.returncode != 0 and "/queue/backend" in autoscaled.stderr
    gpu = helm("template", "demo", str(CHART), "--set", "ray.gpuWorkers.enabled=true")
    assert gpu.returncode != 0 and "/queue/backend" in gpu.stderr
    assert helm("template", "demo", str(CHART), "-f", str(refused), "--set", "queue.backend=redis",
                "--set", "queue.redis.deploy=true").returncode == 0


def test_the_sqlite_queue_volume_is_mounted_on_the_head_only() -> None:
    for documents, workers in ((render(), 0), (render(CHART / "examples" / "multinode-redis.yaml"), 1)):
        cluster = rayservice(documents)["spec"]["rayClusterConfig"]
        assert len(cluster["workerGroupSpecs"]) == workers
        for group in cluster["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            assert "queue" not in {v["name"] for v in pod["volumes"]}
    head = rayservice(render())["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "queue", "mountPath": "/data/queue"} in head["containers"][0]["volumeMounts"]


def test_the_redistill_job_runs_beside_the_head_that_holds_the_sqlite_volume() -> None:
    """A ReadWriteOnce volume mounts on one node: the CronJob must land on the head pod's node (SQLite only)."""
    def job_pod(documents: list[dict]) -> dict:
        cron = next(doc for doc in documents if doc["kind"] == "CronJob")
        return cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]

    documents = render()
    head_labels = rayservice(documents)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    (term,) = job_pod(documents)["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == head_labels
    redis = render(CHART / "examples" / "multinode-redis.yaml")
    assert "affinity" not in job_pod(redis)  # Redis is reached over the network from any node


def test_autoscaling_switch_replaces_num_replicas() -> None:
    assert all("autoscaling_config" not in d for d in serve_deployments(render()).values())  # off by default
    deployments = serve_deployments(render(CHART / "examples" / "multinode-redis.yaml"))
    for name, (low, high) in {"Gateway": (2, 8), "Teacher": (1, 3)}.items():
        assert "num_replicas" not in deployments[name]
        autoscaling = deployments[name]["autoscaling_config"]
        assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (low, high)
        assert autoscaling["target_ongoing_requests"] == AUTOSCALING[name].target_ongoing_requests


def test_gpu_example_puts_the_teacher_on_the_gpu_group() -> None:
    documents = render(CHART / "examples" / "gpu.yaml")
    teacher = serve_deployments(documents)["Teacher"]
    assert teacher["ray_actor_options"]["num_gpus"] == 1
    assert TeacherDeploymentConfig.model_validate(teacher["user_config"]).runtime.device == "cuda"
    groups = {g["groupName"]: g for g in rayservice(documents)["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"gpu-workers"}
    pod = groups["gpu-workers"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_ray_resources_pin_replicas_to_a_worker_group() -> None:
    documents = render(None, "queue.backend=redis", "queue.redis.deploy=true", "ray.workers.replicas=1",
                       json_sets=['ray.workers.rayResources={"teacher": 1}',
                                  'serve.teacher.ray_actor_options.resources={"teacher": 1}'])
    group = rayservice(documents)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {"teacher": 1}
    assert serve_deployments(documents)["Teacher"]["ray_actor_options"]["resources"] == {"teacher": 1}


def test_models_job_builds_the_bundle_and_ray_pods_wait_for_it() -> None:
    assert not any(d["kind"] == "Job" for d in render())
    documents = render(CHART / "examples" / "multinode-redis.yaml")
    job = next(d for d in documents if d["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["cascade", "build", "--if-missing"]
    assert {"name": "models", "mountPath": "/data/models"} in container["volumeMounts"]
    # The builder image (WITH_BUILD_DEPS=1), not the weight-free serving image the Ray pods run.
    head_image = rayservice(documents)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert container["image"] == head_image["image"] + "-builder"
    custom = render(CHART / "examples" / "multinode-redis.yaml", "models.build.image=registry.example/cascade:b1")
    assert next(d for d in custom if d["kind"] == "Job")["spec"]["template"]["spec"]["containers"][0]["image"] \
        == "registry.example/cascade:b1"
    head = rayservice(documents)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert "registry/current" in " ".join(head["initContainers"][0]["command"])


def test_helm_test_pod_classifies_through_the_service() -> None:
    documents = render()
    pod = next(d for d in documents if d["kind"] == "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    service = next(d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == "demo-cascade")
    assert env["CASCADE_URL"] == f"http://demo-cascade:{service['spec']['ports'][0]['port']}"
    script = pod["spec"]["containers"][0]["args"][0]
    compile(script, "helm-test", "exec")  # the hook's Python is valid
    assert "/v1/classify" in script
