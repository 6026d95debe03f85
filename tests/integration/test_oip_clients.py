"""Open Inference Protocol clients unchanged against `cascade serve`: NVIDIA's tritonclient and the KServe SDK.

No hand-made protocol JSON: each client frames its requests (tritonclient sends binary tensor data by default)
and decodes the answers itself; the answers are checked against the same texts through the v1 API.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient._plugin import InferenceServerClientPlugin
from tritonclient.utils import InferenceServerException

from serving.oip import OUTPUTS
from tests.integration.conftest import API_KEY, Gateway, apply_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KSERVE_VENV = ROOT / ".tools" / "kserve-venv"
KSERVE_REQUIREMENTS = Path(__file__).with_name("kserve-requirements.txt")
KSERVE_SCRIPT = Path(__file__).with_name("oip_kserve_client.py")
MODELS = ("cascade", "student", "teacher")
V1_ROUTE = {"cascade": "auto", "student": "student", "teacher": "teacher"}
TEXTS = ["A moving, beautifully acted film that stays with you.", "Tedious, predictable and far too long.",
         "Ünïcode ✓: it was fine, I suppose 🎬"]


class BearerToken(InferenceServerClientPlugin):
    """The gateway's API key on every call, through tritonclient's plugin hook."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, request: Any) -> None:
        request.headers["Authorization"] = f"Bearer {self.key}"


@pytest.fixture(scope="module")
def gateway_client(gateway: Gateway) -> Iterator[httpx.Client]:
    apply_config(gateway)  # the settings every test starts from
    with gateway.client() as client:
        yield client


@pytest.fixture(scope="module")
def triton(gateway: Gateway, gateway_client: httpx.Client) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(gateway.url.removeprefix("http://"), network_timeout=120)
    client.register_plugin(BearerToken(API_KEY))
    yield client
    client.close()


@pytest.fixture(scope="module")
def served_version(gateway_client: httpx.Client) -> str:
    return gateway_client.get("/v1/status").raise_for_status().json()["student_version"]


@pytest.fixture(scope="module")
def reference(gateway_client: httpx.Client) -> dict[str, list[dict]]:
    """What the v1 API answers for the same texts on each route."""
    answers = {}
    for model, route in V1_ROUTE.items():
        response = gateway_client.post("/v1/classify", json={"texts": TEXTS, "route": route})
        assert response.status_code == 200, response.text
        answers[model] = response.json()["results"]
    return answers


def assert_same_answers(labels: list[str], probabilities: np.ndarray, expected: list[dict]) -> None:
    names = list(expected[0]["probabilities"])
    assert probabilities.shape == (len(TEXTS), len(names))
    assert labels == [r["label"] for r in expected]
    np.testing.assert_allclose(probabilities, [[r["probabilities"][n] for n in names] for r in expected], atol=1e-5)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


def triton_texts(binary: bool) -> triton_http.InferInput:
    tensor = triton_http.InferInput("text", [len(TEXTS)], "BYTES")
    tensor.set_data_from_numpy(np.array(TEXTS, dtype=np.object_), binary_data=binary)
    return tensor


# -- tritonclient ---------------------------------------------------------------------------------------------------
def test_tritonclient_reads_server_and_model_metadata(triton: triton_http.InferenceServerClient,
                                                      served_version: str, reference: dict) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    server = triton.get_server_metadata()
    assert server["name"] == "cascade" and server["version"] and "binary_tensor_data" in server["extensions"]
    n_labels = len(reference["cascade"][0]["probabilities"])
    for model in MODELS:
        metadata = triton.get_model_metadata(model)
        assert metadata["name"] == model and metadata["versions"] == [served_version]
        assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        assert {o["name"]: o["datatype"] for o in metadata["outputs"]} == OUTPUTS
        assert next(o for o in metadata["outputs"] if o["name"] == "probabilities")["shape"] == [-1, n_labels]
        assert triton.get_model_metadata(model, served_version) == metadata
        assert triton.is_model_ready(model) and triton.is_model_ready(model, served_version)
    assert not triton.is_model_ready("nope") and not triton.is_model_ready("cascade", "no-such-version")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", MODELS)
def test_tritonclient_infers_three_texts(triton: triton_http.InferenceServerClient, reference: dict,
                                         served_version: str, model: str, binary: bool) -> None:
    """Binary: the client's defaults (binary input, all outputs binary). JSON: binary_data=False everywhere."""
    outputs = None if binary else [triton_http.InferRequestedOutput(name, binary_data=False) for name in OUTPUTS]
    result = triton.infer(model, [triton_texts(binary)], outputs=outputs, request_id=f"triton-{model}")
    response = result.get_response()
    assert response["id"] == f"triton-{model}" and response["model_name"] == model
    assert response["model_version"] == served_version
    assert [o["name"] for o in response["outputs"]] == list(OUTPUTS)
    for output in response["outputs"]:
        assert ("binary_data_size" in (output.get("parameters") or {})) is binary and ("data" in output) is not binary
    labels = [text(v) for v in result.as_numpy("label")]
    assert_same_answers(labels, result.as_numpy("probabilities"), reference[model])
    assert [text(v) for v in result.as_numpy("served_by")] == [r["served_by"] for r in reference[model]]
    assert result.as_numpy("degraded").tolist() == [r["degraded"] for r in reference[model]]


def test_tritonclient_gets_only_the_outputs_it_asks_for_on_the_versioned_route(
        triton: triton_http.InferenceServerClient, reference: dict, served_version: str) -> None:
    outputs = [triton_http.InferRequestedOutput("probabilities", binary_data=True),
               triton_http.InferRequestedOutput("label", binary_data=False)]
    result = triton.infer("student", [triton_texts(True)], model_version=served_version, outputs=outputs,
                          parameters={"not_a_cascade_parameter": 3})
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["probabilities", "label"]
    assert "binary_data_size" in response["outputs"][0]["parameters"] and "data" in response["outputs"][1]
    assert result.as_numpy("served_by") is None
    assert_same_answers([text(v) for v in result.as_numpy("label")], result.as_numpy("probabilities"),
                        reference["student"])


def test_tritonclient_is_told_which_version_is_served(triton: triton_http.InferenceServerClient,
                                                      served_version: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("cascade", [triton_texts(True)], model_version="no-such-version")
    assert caught.value.status() == "404" and served_version in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        triton.get_model_metadata("teacher", "no-such-version")
    assert caught.value.status() == "404" and served_version in caught.value.message()


@pytest.mark.parametrize("cut", [3, -3], ids=["truncated", "extra-bytes"])
def test_tritonclient_bad_binary_body_is_400_json(triton: triton_http.InferenceServerClient, cut: int) -> None:
    """The BYTES data no longer matches its binary_data_size; tritonclient reads our JSON error's message
    (a non-JSON body would surface as its 'exception ... while decoding the response')."""
    tensor = triton_texts(True)
    tensor._raw_data = tensor._raw_data[:-cut] if cut > 0 else tensor._raw_data + b"\x00" * -cut
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("cascade", [tensor])
    assert caught.value.status() == "400", caught.value
    assert "binary" in caught.value.message() and "decoding the response" not in caught.value.message()


# -- the KServe Python SDK ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kserve_python() -> Path:
    """The SDK's own virtual environment, made when missing (a fresh clone, CI)."""
    python = KSERVE_VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import kserve"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(KSERVE_VENV)], check=True, timeout=300)
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(KSERVE_REQUIREMENTS)],
                               capture_output=True, text=True, timeout=1200)
    assert installed.returncode == 0, f"installing the KServe SDK failed:\n{installed.stdout}\n{installed.stderr}"
    return python


@pytest.fixture(scope="module")
def kserve_report(kserve_python: Path, gateway: Gateway, gateway_client: httpx.Client) -> dict[str, Any]:
    run = subprocess.run([str(kserve_python), str(KSERVE_SCRIPT), gateway.url, API_KEY, json.dumps(TEXTS)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"the KServe client failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return json.loads(run.stdout)


def test_kserve_sdk_reads_health_and_metadata(kserve_report: dict, served_version: str) -> None:
    assert kserve_report["live"] is True and kserve_report["ready"] is True
    assert kserve_report["server_metadata"]["name"] == "cascade"
    assert "binary_tensor_data" in kserve_report["server_metadata"]["extensions"]
    for model in MODELS:
        entry = kserve_report["models"][model]
        assert entry["ready"] is True
        assert entry["metadata"]["name"] == model and entry["metadata"]["versions"] == [served_version]
        assert [o["name"] for o in entry["metadata"]["outputs"]] == list(OUTPUTS)
    assert kserve_report["unknown_model_ready"] is False


@pytest.mark.parametrize("mode", ["binary", "json"])
@pytest.mark.parametrize("model", MODELS)
def test_kserve_sdk_infers_three_texts(kserve_report: dict, reference: dict, model: str, mode: str) -> None:
    answer = kserve_report["models"][model][mode]
    assert answer["id"] == f"kserve-{model}-{mode}" and answer["model_name"] == model
    assert answer["binary_response"] is (mode == "binary")
    outputs = answer["outputs"]
    assert list(outputs) == list(OUTPUTS)
    probabilities = np.asarray(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    assert_same_answers(outputs["label"]["data"], probabilities, reference[model])
    assert outputs["degraded"]["data"] == [r["degraded"] for r in reference[model]]


def test_kserve_sdk_gets_only_the_outputs_it_asks_for(kserve_report: dict, reference: dict) -> None:
    outputs = kserve_report["requested_outputs"]
    assert list(outputs) == ["probabilities"] and outputs["probabilities"]["datatype"] == "FP32"
    expected = [[r["probabilities"][n] for n in r["probabilities"]] for r in reference["student"]]
    np.testing.assert_allclose(np.asarray(outputs["probabilities"]["data"]).reshape(len(TEXTS), -1), expected,
                               atol=1e-5)


def test_kserve_sdk_bad_binary_body_is_400_json(kserve_report: dict) -> None:
    bad = kserve_report["bad_binary"]
    assert bad["status"] == 400 and bad["content_type"] == "application/json"
    assert "binary_data_size" in bad["body"]["error"] and bad["body"]["id"]
