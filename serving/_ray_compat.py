"""Every use of Ray's private API, in one place, pinned to the Ray the project tests.

Ray does not promise these names across releases. Each function here names what it reaches for and why no
public API gives it; on an upgrade, this module and its test (tests/unit/test_ray_compat.py) are the list to
check. Imported lazily inside each function, so importing this module costs nothing.
"""

from __future__ import annotations

import os
from typing import Any

TESTED_RAY = "2.60.0"  # pyproject.toml pins ray[serve] to this version


def check_version() -> None:
    """Fail early and clearly on a Ray this module was not checked against."""
    import ray

    if ray.__version__ != TESTED_RAY:
        raise RuntimeError(f"Cascade uses Ray private APIs checked against Ray {TESTED_RAY}; found {ray.__version__}")


def serve_request_id() -> str | None:
    """Serve's id of the request being handled (it honours a client's X-Request-ID and writes it on every replica
    log line); the public context API gives no request id."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or None


def live_max_ongoing_requests() -> int | None:
    """This replica's live ``max_ongoing_requests`` (Serve updates it on a config change), or None outside a
    replica; the public replica context does not carry the deployment config."""
    from ray.serve.context import _get_internal_replica_context

    context = _get_internal_replica_context()
    return None if context is None else int(context._deployment_config.max_ongoing_requests)


def start_serve_and_deploy(schema: Any) -> None:
    """What `serve run` does, without blocking: start Serve with the config's HTTP options, proxy location and
    logging, then deploy its applications. The public `serve.run` takes one application, not a deploy schema."""
    from ray.serve._private import api as serve_api

    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   proxy_location=schema.proxy_location,
                                   global_logging_config=schema.logging_config)
    client.deploy_apps(schema, _blocking=False)


def disable_failure_signal_handler() -> None:
    """Ray's crash reporter (absl's failure signal handler, installed by ray.init) treats SIGTERM as a crash and
    aborts the process while a clean stop is still running. Must be called before ray.init."""
    from ray._private import ray_constants

    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True


def local_node() -> Any:
    """The Node object of the Ray that ray.init started in this process (None when it joined a cluster)."""
    import ray

    return ray._private.worker._global_node


def haproxy_config_path(node_id: str) -> str:
    """Where Serve's HAProxy manager writes this node's HAProxy config (its command line names it)."""
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_CONFIG_FILE_LOC

    return os.path.join(os.path.dirname(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC), node_id,
                        os.path.basename(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC))
