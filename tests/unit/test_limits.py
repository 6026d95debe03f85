"""ProcessLimits: one model whose values become HAProxy's environment, Serve's http_options and the chart's env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve._private.haproxy import HAProxyConfig
from ray.serve.schema import ServeDeploySchema

from serving.app import default_serve_config
from serving.settings import ProcessLimits

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "helm"
CUSTOM = ProcessLimits(request_timeout_s=7.5, client_timeout_s=3, keep_alive_timeout_s=12, max_header_bytes=4096,
                       max_connections=200)


def test_limits_become_haproxy_environment() -> None:
    assert CUSTOM.haproxy_env() == {
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "3",
        "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": "10",  # ceil(7.5) + 2: the replica's 408 comes first
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": "5120",  # 4096 of headers + HAProxy's 1 KiB rewrite reserve
        "RAY_SERVE_HAPROXY_MAXCONN": "200",
    }
    assert CUSTOM.http_options() == {"request_timeout_s": 7.5, "keep_alive_timeout_s": 12}


def test_every_variable_is_one_ray_reads() -> None:
    """Ray's constants module names each variable we set (a renamed one would be silently ignored)."""
    import ray.serve._private.constants as constants

    source = Path(constants.__file__).read_text()
    for name in ProcessLimits().haproxy_env():
        assert f'"{name}"' in source, f"Ray {constants.__name__} does not read {name}"


RENDER = """
import json
import sys
from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
from ray.serve.config import HTTPOptions

folder = sys.argv[1]
config = HAProxyConfig(http_options=HTTPOptions(**json.loads(sys.argv[2])), socket_path=folder + "/admin.sock")
api = HAProxyApi(cfg=config, config_file_path=folder + "/haproxy.cfg")
api._generate_config_file_internal()
"""


def test_ray_writes_them_into_haproxys_config(tmp_path: Path) -> None:
    """A fresh process with our environment (Ray reads it at import) renders the HAProxy config Ray would run."""
    env = {**os.environ, **CUSTOM.haproxy_env()}
    subprocess.run([sys.executable, "-c", RENDER, str(tmp_path), json.dumps(CUSTOM.http_options())], env=env,
                   check=True, timeout=120, capture_output=True)
    lines = {" ".join(line.split()) for line in (tmp_path / "haproxy.cfg").read_text().splitlines()}
    for directive in ("maxconn 200", "tune.bufsize 5120", "timeout client 3s", "timeout server 10s",
                      "timeout http-keep-alive 12s"):
        assert directive in lines, f"{directive!r} not in Ray's HAProxy config"


def test_defaults_keep_rays_buffer_and_connections_and_bound_the_rest() -> None:
    limits = ProcessLimits()
    env = limits.haproxy_env()
    assert env["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"] == str(HAProxyConfig().bufsize)  # headers up to ~15 KiB as before
    assert env["RAY_SERVE_HAPROXY_MAXCONN"] == str(HAProxyConfig().maxconn)
    assert int(env["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"]) < HAProxyConfig().timeout_client_s  # not Ray's hour
    assert float(env["RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S"]) > limits.request_timeout_s


def test_the_built_in_serve_config_carries_them_and_serve_accepts_it() -> None:
    config = default_serve_config()
    assert ProcessLimits.from_serve_config(config) == ProcessLimits()
    schema = ServeDeploySchema.model_validate(config)  # process_limits is an extra key Serve ignores
    assert schema.http_options.request_timeout_s == ProcessLimits().request_timeout_s
    assert schema.http_options.keep_alive_timeout_s == ProcessLimits().keep_alive_timeout_s


def test_a_config_file_sets_them_and_may_leave_them_out() -> None:
    config = {"process_limits": {"client_timeout_s": 2}, "http_options": {"port": 8123}}
    assert ProcessLimits.from_serve_config(config).client_timeout_s == 2
    assert ProcessLimits.from_serve_config({"applications": []}) == ProcessLimits()


def test_http_options_that_contradict_process_limits_are_refused() -> None:
    config = {"process_limits": {"request_timeout_s": 5}, "http_options": {"request_timeout_s": 60}}
    with pytest.raises(ValueError, match=r"http_options\.request_timeout_s"):
        ProcessLimits.from_serve_config(config)
    agreeing = {"process_limits": {"request_timeout_s": 5}, "http_options": {"request_timeout_s": 5.0}}
    assert ProcessLimits.from_serve_config(agreeing).request_timeout_s == 5


@pytest.mark.parametrize("bad", [{"client_timeout_s": 0}, {"max_header_bytes": 100}, {"max_connections": 0},
                                 {"request_timeout_s": -1}, {"max_conections": 10}])
def test_bad_limits_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        ProcessLimits.model_validate(bad)


def _helm_env(*sets: str) -> tuple[list[dict], dict]:
    if not HELM.is_file():
        pytest.fail("helm not found: `make .tools/helm` (part of `make test`) fetches it")
    args = [str(HELM), "template", "demo", str(ROOT / "helm" / "cascade"), "--set", "ray.workers.replicas=1",
            "--set", "queue.backend=redis", "--set", "queue.redis.deploy=true"]
    for item in sets:
        args += ["--set-json", item]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    service = next(d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"], *(group["template"] for group in cluster["workerGroupSpecs"])]
    return [pod["spec"]["containers"][0]["env"] for pod in pods], yaml.safe_load(service["spec"]["serveConfigV2"])


@pytest.mark.parametrize("limits", [ProcessLimits(), CUSTOM], ids=["defaults", "custom"])
def test_the_chart_sets_the_same_environment_on_every_ray_pod(limits: ProcessLimits) -> None:
    """The chart's template derives the variables itself; it must agree with ProcessLimits.haproxy_env."""
    sets = [f"serve.process_limits.{key}={value}" for key, value in limits.model_dump().items()]
    envs, serve_config = _helm_env(*sets)
    assert len(envs) == 2  # head and the CPU worker group
    for env in envs:
        haproxy = {item["name"]: item["value"] for item in env if item["name"].startswith("RAY_SERVE_HAPROXY_")}
        assert haproxy == limits.haproxy_env()
    assert ProcessLimits.from_serve_config(serve_config) == limits
    assert {key: serve_config["http_options"][key] for key in limits.http_options()} == limits.http_options()


def test_the_chart_refuses_a_bad_limit() -> None:
    result = subprocess.run([str(HELM), "template", "demo", str(ROOT / "helm" / "cascade"), "--set-json",
                             "serve.process_limits.max_connections=0"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "max_connections" in result.stderr
