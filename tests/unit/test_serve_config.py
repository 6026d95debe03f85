from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from serving.app import default_serve_config
from serving.settings import GatewayConfig, TeacherDeploymentConfig

ROOT = Path(__file__).resolve().parents[2]


def test_deploy_serve_yaml_is_the_config_cascade_serve_deploys() -> None:
    on_disk = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    assert on_disk == default_serve_config()
    schema = ServeDeploySchema.model_validate(on_disk)
    gateway = next(d for d in schema.applications[0].deployments if d.name == "Gateway")
    GatewayConfig.model_validate(gateway.user_config)  # every user_config field is a real setting
    assert gateway.ray_actor_options.num_cpus < 1 and gateway.max_ongoing_requests > 5
    teacher = next(d for d in schema.applications[0].deployments if d.name == "Teacher")
    assert TeacherDeploymentConfig.model_validate(teacher.user_config).batch.max_batch_size >= 1


def test_bad_user_config_is_refused() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        GatewayConfig.model_validate({"teacher": {"max_share": 2.0}})
    with pytest.raises(ValidationError):
        GatewayConfig.model_validate({"routing": {"confidence_measure": "vibes"}})
    with pytest.raises(ValidationError):
        TeacherDeploymentConfig.model_validate({"batch": {"max_batch_size": 0}})
