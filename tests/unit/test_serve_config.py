"""The Serve config and the chart's values come from the settings models: generated files that are never stale."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serving import generate
from serving.app import AUTOSCALING, DEPLOYMENT_OPTIONS, default_serve_config
from serving.chart import ChartValues
from serving.settings import GatewayConfig, TeacherDeploymentConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted(generate.GENERATED))
def test_generated_file_is_not_stale(path: str) -> None:
    """Regenerated in memory and compared: a changed default fails here until `cascade generate` runs."""
    assert (ROOT / path).read_text() == generate.GENERATED[path](), f"{path} is stale: run `cascade generate`"


def test_staleness_is_detected(tmp_path: Path) -> None:
    for path in generate.GENERATED:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    assert sorted(generate.write(tmp_path)) == sorted(generate.GENERATED)
    assert generate.stale(tmp_path) == []
    values = tmp_path / "helm/cascade/values.yaml"
    values.write_text(values.read_text().replace("max_share: 0.5", "max_share: 0.6"))
    assert generate.stale(tmp_path) == ["helm/cascade/values.yaml"]


def test_deploy_serve_yaml_is_the_config_cascade_serve_deploys() -> None:
    on_disk = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    assert on_disk == default_serve_config()
    schema = ServeDeploySchema.model_validate(on_disk)
    gateway = next(d for d in schema.applications[0].deployments if d.name == "Gateway")
    GatewayConfig.model_validate(gateway.user_config)  # every user_config field is a real setting
    assert gateway.ray_actor_options.num_cpus < 1 and gateway.max_ongoing_requests > 5
    assert "autoscaling_config" not in on_disk["applications"][0]["deployments"][0]  # fixed replicas by default
    teacher = next(d for d in schema.applications[0].deployments if d.name == "Teacher")
    assert TeacherDeploymentConfig.model_validate(teacher.user_config).batch.max_batch_size >= 1


def test_autoscale_puts_autoscaling_config_in_place_of_num_replicas() -> None:
    config = default_serve_config(autoscale=True)
    schema = ServeDeploySchema.model_validate(config)  # Serve refuses num_replicas beside autoscaling_config
    for deployment in schema.applications[0].deployments:
        raw = next(d for d in config["applications"][0]["deployments"] if d["name"] == deployment.name)
        assert "num_replicas" not in raw
        assert deployment.autoscaling_config["max_replicas"] == AUTOSCALING[deployment.name].max_replicas
        assert deployment.max_ongoing_requests == DEPLOYMENT_OPTIONS[deployment.name]["max_ongoing_requests"]


def test_chart_values_are_the_serve_config_and_typed() -> None:
    values = yaml.safe_load((ROOT / "helm" / "cascade" / "values.yaml").read_text())
    ChartValues.model_validate(values)
    serve = default_serve_config()["applications"][0]["deployments"]
    gateway = {k: v for k, v in values["serve"]["gateway"].items() if k not in ("autoscaling", "user_config")}
    assert {"name": "Gateway", **gateway} == {k: v for k, v in serve[0].items() if k != "user_config"}
    with pytest.raises(ValidationError):
        ChartValues.model_validate(values | {"queue": {"backend": "kafka"}})


def test_bad_user_config_is_refused() -> None:
    with pytest.raises(ValidationError):
        GatewayConfig.model_validate({"teacher": {"max_share": 2.0}})
    with pytest.raises(ValidationError):
        GatewayConfig.model_validate({"routing": {"confidence_measure": "vibes"}})
    with pytest.raises(ValidationError):
        TeacherDeploymentConfig.model_validate({"batch": {"max_batch_size": 0}})
