"""Cascade through the KServe Python SDK's REST client, as a KServe user would call it.

Run by the Python of its own virtual environment (.tools/kserve-venv: the SDK pins versions of pydantic,
protobuf and psutil that differ from the gateway's), so it imports nothing from the project. It prints one
JSON document of what the SDK saw; tests/integration/test_oip_clients.py asserts on it.

Usage: python oip_kserve_client.py URL API_KEY TEXTS_JSON
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Generator
from typing import Any

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, InferResponse, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from kserve.protocol.rest.v2_datamodels import ModelMetadataResponse, ServerMetadataResponse

MODELS = ("cascade", "student", "teacher")
HEADER_LENGTH = "inference-header-content-length"


class Bearer(httpx.Auth):
    """The gateway's API key, through the SDK's documented ``auth`` hook."""

    def __init__(self, key: str) -> None:
        self.key = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.key}"
        yield request


def texts_input(texts: list[str], binary: bool) -> InferInput:
    tensor = InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=np.object_), binary_data=binary)
    return tensor


def outputs_of(response: InferResponse) -> dict[str, dict[str, Any]]:
    decoded = {}
    for output in response.outputs:
        values = output.as_numpy()
        decoded[output.name] = {"datatype": output.datatype, "shape": list(output.shape),
                                "data": [v.decode() if isinstance(v, bytes) else v for v in values.ravel().tolist()]}
    return decoded


async def infer(client: InferenceRESTClient, url: str, model: str, texts: list[str], binary: bool) -> dict[str, Any]:
    request = InferRequest(model_name=model, infer_inputs=[texts_input(texts, binary)],
                           request_id=f"kserve-{model}-{'binary' if binary else 'json'}",
                           parameters={"binary_data_output": True} if binary else None)
    headers: dict[str, str] = {}
    response = await client.infer(url, request, model_name=model, response_headers=headers)
    return {"id": response.id, "model_name": response.model_name, "binary_response": HEADER_LENGTH in headers,
            "outputs": outputs_of(response)}


async def bad_binary_body(client: InferenceRESTClient, url: str, texts: list[str]) -> dict[str, Any]:
    """A request whose BYTES data was cut after binary_data_size was set: the server must refuse it as 400 JSON."""
    tensor = texts_input(texts, binary=True)
    tensor._raw_data = tensor._raw_data[:-3]
    try:
        await client.infer(url, InferRequest(model_name="cascade", infer_inputs=[tensor]), model_name="cascade")
    except httpx.HTTPStatusError as exc:
        return {"status": exc.response.status_code, "content_type": exc.response.headers.get("content-type"),
                "body": exc.response.json(), "message": str(exc)}
    return {"status": 200}


async def main(url: str, key: str, texts: list[str]) -> dict[str, Any]:
    auth = Bearer(key)
    report: dict[str, Any] = {"models": {}}
    async with InferenceRESTClient(RESTConfig(protocol="v2", auth=auth, timeout=120)) as client, \
            httpx.AsyncClient(base_url=url, auth=auth, timeout=60) as plain:
        report["live"] = await client.is_server_live(url)
        report["ready"] = await client.is_server_ready(url)
        # The SDK's REST client has no metadata calls; KServe's own v2 data models validate the answers instead.
        server = (await plain.get("/v2")).raise_for_status().json()
        report["server_metadata"] = ServerMetadataResponse.model_validate(server).model_dump()
        for model in MODELS:
            metadata = (await plain.get(f"/v2/models/{model}")).raise_for_status().json()
            report["models"][model] = {
                "metadata": ModelMetadataResponse.model_validate(metadata).model_dump(),
                "ready": await client.is_model_ready(url, model),
                "binary": await infer(client, url, model, texts, binary=True),
                "json": await infer(client, url, model, texts, binary=False),
            }
        report["unknown_model_ready"] = await client.is_model_ready(url, "nope")
        asked = InferRequest(model_name="student", infer_inputs=[texts_input(texts, True)],
                             request_outputs=[RequestedOutput("probabilities", {"binary_data": True})])
        report["requested_outputs"] = outputs_of(await client.infer(url, asked, model_name="student"))
        report["bad_binary"] = await bad_binary_body(client, url, texts)
    return report


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))))
