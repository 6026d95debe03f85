"""The floor Cascade is measured against: one process, uvicorn + Starlette + ONNX Runtime, same student.

Run: ``CASCADE_HOME=models uvicorn loadtests.plain_server:app --port 8090``. No batching, no
routing, no Ray: what a user would write in an afternoon to serve the student alone.
"""

from __future__ import annotations

import json
import os

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bundle.registry import Registry
from bundle.runtime import StudentRuntime
from routing.confidence import softmax

_bundle = Registry(os.environ.get("CASCADE_HOME", "models")).load()
_student = StudentRuntime(_bundle.student_path, _bundle.tokenizer_dir, _bundle.manifest.max_length,
                          threads=int(os.environ.get("CASCADE_PLAIN_THREADS", "1")))
_labels = _bundle.manifest.labels


async def classify(request: Request) -> JSONResponse:
    payload = json.loads(await request.body())
    probs = softmax(_student.logits(payload["texts"]), _bundle.manifest.temperatures.student)
    return JSONResponse({"results": [
        {"label": _labels[int(np.argmax(p))], "probabilities": dict(zip(_labels, map(float, p), strict=True))}
        for p in probs]})


app = Starlette(routes=[Route("/v1/classify", classify, methods=["POST"])])
