"""ProcessLimits as the programs that read them render them: Ray's HAProxy config writer (in a fresh process, since
Ray reads the variables at import) and the chart's template (`helm template`). No Ray cluster, no server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serving.settings import ProcessLimits

pytestmark = pytest.mark.integration  # a Python subprocess and helm in subprocesses

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools" / "helm"
CUSTOM = ProcessLimits(request_timeout_s=7.5, client_timeout_s=3, keep_alive_timeout_s=12, max_header_bytes=4096,
                       max_connections=200)

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
    """The chart's template derives the variables itself; it must agree with ProcessLimits.haproxy_env, and set
    the same HAProxy retry policy as `cascade serve`'s fast path."""
    from cli.main import FAST_PATH_ENV

    retries = {key: value for key, value in FAST_PATH_ENV.items() if key.startswith("RAY_SERVE_HAPROXY_")}
    assert retries, "the fast path sets HAProxy's retry policy"
    sets = [f"serve.process_limits.{key}={value}" for key, value in limits.model_dump().items()]
    envs, serve_config = _helm_env(*sets)
    assert len(envs) == 2  # head and the CPU worker group
    for env in envs:
        haproxy = {item["name"]: item["value"] for item in env if item["name"].startswith("RAY_SERVE_HAPROXY_")}
        assert haproxy == limits.haproxy_env() | retries
    assert ProcessLimits.from_serve_config(serve_config) == limits
    assert {key: serve_config["http_options"][key] for key in limits.http_options()} == limits.http_options()


def test_the_chart_refuses_a_bad_limit() -> None:
    result = subprocess.run([str(HELM), "template", "demo", str(ROOT / "helm" / "cascade"), "--set-json",
                             "serve.process_limits.max_connections=0"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "max_connections" in result.stderr
