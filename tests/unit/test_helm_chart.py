"""The Helm chart, rendered and validated with no cluster: helm lint and template, kubernetes-validate
--strict on core resources, and the CRD schemas (KubeRay, prometheus-operator) for the rest."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

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
    result = helm("template", "demo", str(CHART), "--set", "serve.port=eighty")
    assert result.returncode != 0
    assert "/serve/port" in result.stderr and "want integer" in result.stderr
    bad_backend = helm("template", "demo", str(CHART), "--set", "queue.backend=kafka")
    assert bad_backend.returncode != 0 and "/queue/backend" in bad_backend.stderr


def test_crd_validation_catches_a_broken_rayservice() -> None:
    service = next(doc for doc in render() if doc["kind"] == "RayService")
    broken = copy.deepcopy(service)
    del broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(broken)


def test_serve_config_in_the_rayservice_is_deploy_serve_yaml() -> None:
    """Same application config as deploy/serve.yaml; the chart sets only the queue URL on purpose."""
    service = next(doc for doc in render() if doc["kind"] == "RayService")
    rendered = yaml.safe_load(service["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    gateway = next(d for d in rendered["applications"][0]["deployments"] if d["name"] == "Gateway")
    assert gateway["user_config"]["queue"]["url"] == "sqlite:////data/queue/queue.db"
    gateway["user_config"]["queue"]["url"] = None  # deploy/serve.yaml: SQLite beside the models
    assert rendered == shipped


def test_values_change_the_serve_config_and_the_queue() -> None:
    documents = render(None, "queue.backend=redis", "queue.redis.deploy=true", "serve.teacher.numReplicas=3",
                       "serve.teacher.niceness=10",
                       json_sets=["serve.gateway.userConfig.routing.threshold=0.8"])
    service = next(doc for doc in documents if doc["kind"] == "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert deployments["Gateway"]["user_config"]["routing"]["threshold"] == 0.8
    assert deployments["Gateway"]["user_config"]["queue"]["url"] == "redis://demo-cascade-redis:6379/0"
    assert deployments["Teacher"]["num_replicas"] == 3
    assert deployments["Teacher"]["ray_actor_options"]["runtime_env"]["env_vars"]["RAY_worker_niceness"] == "10"
    assert "PersistentVolumeClaim" in {d["kind"] for d in documents}  # the models volume
    assert not any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"].endswith("-queue")
                   for d in documents)
