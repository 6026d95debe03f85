"""Real servers for the tests (Debian packages, MLServer in its own venv), on 127.0.0.1 and free ports only."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from loadtests.bench import wait_ready
from tests.conftest import CASCADE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throwaway ``redis-server`` (no persistence) on 127.0.0.1; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: `make system-deps` installs it")
    port = free_port()
    process = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
                                "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


ROOT = Path(__file__).resolve().parents[1]
MLSERVER_VENV = ROOT / ".tools" / "mlserver-venv"
MLSERVER = MLSERVER_VENV / "bin" / "mlserver"


def mlserver_binary() -> Path:
    """MLServer in its own venv (its pins clash with Ray's), made by `make mlserver` when missing."""
    if not MLSERVER.is_file():
        subprocess.run(["make", "-C", str(ROOT), "mlserver"], check=True, timeout=1800)
    return MLSERVER


def hf_teacher_folder(bundle_dir: Path, target: Path) -> Path:
    """One Hugging Face folder (model + tokenizer) from a bundle's teacher/ and tokenizer/, as a server loads it."""
    target.mkdir(parents=True, exist_ok=True)
    for source in ("teacher", "tokenizer"):
        for path in (bundle_dir / source).iterdir():
            shutil.copy2(path, target / path.name)
    return target


def hf_model_settings(name: str, model_dir: Path) -> dict:
    """mlserver-huggingface serving a local text-classification folder (every label's score, not just the top)."""
    return {"name": name, "implementation": "mlserver_huggingface.HuggingFaceRuntime",
            "parameters": {"extra": {"task": "text-classification", "pretrained_model": str(model_dir),
                                     "pretrained_tokenizer": str(model_dir)}}}


def logits_model_settings(name: str, model_dir: Path, max_length: int) -> dict:
    """Our own MLServer runtime (tests/mlserver_runtimes) answering an FP32 logits tensor: the `tensor` output."""
    return {"name": name, "implementation": "logits_runtime.LogitsRuntime",
            "parameters": {"uri": str(model_dir), "extra": {"max_length": max_length}}}


RUNTIMES = Path(__file__).resolve().parent / "mlserver_runtimes"


class MLServer:
    """``mlserver start`` on 127.0.0.1 and free ports, with a models folder; killable and restartable."""

    def __init__(self, workdir: Path, models: dict[str, dict], port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.models = models
        self.process: subprocess.Popen | None = None
        self.log = workdir / "mlserver.log"
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1", "http_port": self.port, "grpc_port": free_port(), "metrics_port": self.metrics_port,
            "parallel_workers": 0, "load_models_at_startup": True, "debug": False}))
        for name, settings in models.items():
            (workdir / name).mkdir(exist_ok=True)
            (workdir / name / "model-settings.json").write_text(json.dumps(settings))
            for runtime in RUNTIMES.glob("*.py"):  # MLServer imports a custom runtime from the model's folder
                shutil.copy2(runtime, workdir / name / runtime.name)

    def start(self, timeout_s: float = 180.0) -> float:
        """Start and wait until every model is ready; returns the time that took (seconds)."""
        started = time.monotonic()
        env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                            "MKL_NUM_THREADS": "1"}
        with self.log.open("a") as log:
            self.process = subprocess.Popen([str(mlserver_binary()), "start", str(self.workdir)], cwd=self.workdir,
                                            env=env, stdout=log, stderr=subprocess.STDOUT)
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() - started > timeout_s:
                self.stop()
                raise RuntimeError(f"MLServer did not become ready; log:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.2)
        return time.monotonic() - started

    def ready(self) -> bool:
        try:
            if httpx.get(f"{self.url}/v2/health/ready", timeout=1.0).status_code != 200:
                return False
            return all(httpx.get(f"{self.url}/v2/models/{name}/ready", timeout=1.0).status_code == 200
                       for name in self.models)
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """``kill -9``: no goodbye to clients, connections drop mid-call."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def mlserver(workdir: Path, models: dict[str, dict]) -> Iterator[MLServer]:
    """A started MLServer serving ``models`` (name -> model-settings); stopped afterwards."""
    server = MLServer(workdir, models)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def stop_ray() -> None:
    """`ray stop --force`, then any Ray Serve HAProxy it orphaned: a forced stop kills the actor that owns
    HAProxy, which would keep listening on the serving port and make the next gateway's start fail."""
    subprocess.run([str(Path(CASCADE).with_name("ray")), "stop", "--force"], capture_output=True, timeout=120)
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "haproxy" and any("haproxy-serve" in arg for arg in process.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                process.kill()


@dataclass
class Served:
    """A running `cascade serve`: where it answers, its process (the leader of its own session) and its log."""

    url: str
    port: int
    process: subprocess.Popen
    log: Path


def merged(base: Mapping[str, Any], *overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with each override merged in, in order: where a dict meets a dict they merge key by key,
    all the way down; any other value (a number, None, a list) replaces what was there."""
    result = copy.deepcopy(dict(base))
    for override in overrides:
        for key, value in override.items():
            if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
                result[key] = merged(result[key], value)
            else:
                result[key] = copy.deepcopy(value)
    return result


def serve_config_with(port: int = 8000, *, autoscale: bool = False, **deployments: Mapping[str, Any]) -> dict:
    """The Serve config `cascade serve` deploys (``default_serve_config(port, autoscale)``) with each named
    deployment's settings merged in (`merged`), e.g.
    ``serve_config_with(port, Gateway={"num_replicas": 1, "user_config": {"routing": {"threshold": 1.0}}})``:
    user_config's sections and ray_actor_options keep the keys an override does not name. A name that is not a
    deployment of the config is an error, not a silent no-op."""
    from serving.app import default_serve_config  # imported here: unit tests import this module without Ray

    config = default_serve_config(port, autoscale)
    existing = {d["name"]: d for d in config["applications"][0]["deployments"]}
    unknown = set(deployments) - set(existing)
    if unknown:
        raise KeyError(f"no deployment named {sorted(unknown)} in the Serve config (there are {sorted(existing)})")
    config["applications"][0]["deployments"] = [merged(d, deployments.get(d["name"], {})) for d in existing.values()]
    return config


@contextmanager
def cascade_serve(*args: str, port: int, home: Path, log: Path, env: Mapping[str, str] | None = None,
                  config: dict | None = None, timeout_s: float = 300, own_ray: bool = True) -> Iterator[Served]:
    """`cascade serve --port PORT *args` on the model home ``home``, ready on /v2/health/ready; stopped afterwards.

    ``config``: a Serve config (`serve_config_with`), written beside the log as serve.yaml and passed as
    ``--config``. ``env`` is set over this process's environment. ``own_ray``: serve starts a local Ray of its own,
    so any Ray on this machine is stopped before and after (`stop_ray`); False when it joins a cluster
    (``--address``) that its fixture owns and stops. Not ready in ``timeout_s`` or exited: RuntimeError with the
    tail of the log. The test may stop the process itself (a signal to its group, ``process.pid``): then the
    stop here only waits for it.
    """
    if config is not None:
        path = log.with_name("serve.yaml")
        path.write_text(yaml.safe_dump(config))
        args = (*args, "--config", str(path))
    if own_ray:
        stop_ray()
    environment = os.environ | dict(env or {}) | {"CASCADE_HOME": str(home)}
    with log.open("w") as out:  # its own session: a last-resort SIGKILL reaches Ray's processes it started too
        process = subprocess.Popen([CASCADE, "serve", "--port", str(port), *args], stdout=out,
                                   stderr=subprocess.STDOUT, env=environment, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, "/v2/health/ready", timeout_s, process)
        except RuntimeError as exc:
            raise RuntimeError(f"cascade serve: {exc}; its log ends:\n{log.read_text()[-4000:]}") from None
        yield Served(url, port, process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        if own_ray:
            stop_ray()
