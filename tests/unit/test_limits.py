"""ProcessLimits: one model whose values become HAProxy's environment, Serve's http_options and the chart's env.

How Ray's HAProxy writer and the chart render them (a subprocess, helm): tests/integration/test_limits_rendered.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from ray.serve._private.haproxy import HAProxyConfig
from ray.serve.schema import ServeDeploySchema

from serving.app import default_serve_config
from serving.settings import ProcessLimits

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
