"""The HTTP ingress on Ray Serve: a thin adapter over the Ray-free ``serving.cascade.Cascade``.

Each route parses its body, calls the cascade, and maps the answer and the cascade's errors to HTTP
(``serving.http``). The student runs in this replica, so a confident text never leaves it; only
deferred texts cross to the Teacher deployment, through the Serve handle's ``ServeTeacher`` adapter.
"""


import asyncio
import logging
import logging.handlers
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers

from routing.policy import Route
from serving import _ray_compat, http, oip, replica_state
from serving.cascade import Cascade, Overloaded, QueueFull, RejectedInput
from serving.deployment import DEPLOYMENT_OPTIONS
from serving.http import ApiError, api
from serving.metrics import GatewayMetrics
from serving.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    FeedbackRequest,
    FeedbackResponse,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ServerMetadata,
    json_body,
)
from serving.settings import AuthSettings, GatewayConfig, LimitSettings
from serving.teacher import ServeTeacher

logger = logging.getLogger("ray.serve")

MODEL_ROUTES = {"cascade": Route.AUTO, "student": Route.STUDENT, "teacher": Route.TEACHER}
# The v2 infer routes read their own body (JSON, or the binary tensor data extension) and may answer in binary.
INFER_OPENAPI = {**json_body(InferRequest), "responses": {"200": {
    "content": {oip.BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    "headers": {oip.HEADER_LENGTH: {"description": "Bytes of the JSON header before the binary outputs (only when "
                                                   "an output was asked for as binary data)",
                                    "schema": {"type": "string"}}}}}}


def _log_to_replica_log(*names: str) -> None:
    """Send the warnings of the rooms a replica runs (the queue writer's "disk is full") to the replica's log.

    Serve writes only its own logger ("ray.serve", which does not propagate) to the replica's log file, and the
    fast path turns its stderr off, so any other logger's records were lost without a trace. Serve buffers its
    request-path records; these are rare and must be seen when they happen, so they go straight to the file.
    """
    for name in names:
        room = logging.getLogger(name)
        for handler in logging.getLogger("ray.serve").handlers:
            if isinstance(handler, logging.handlers.MemoryHandler) and handler.target is not None:
                handler = handler.target
            if handler not in room.handlers:
                room.addHandler(handler)
        room.propagate = False


def max_ongoing_requests() -> int:
    """This deployment's live ``max_ongoing_requests``; outside a replica, the deployment's option."""
    live = _ray_compat.live_max_ongoing_requests()
    return int(DEPLOYMENT_OPTIONS["Gateway"]["max_ongoing_requests"]) if live is None else live


@serve.ingress(api)
class Gateway:
    """Ingress replica: parse, call the cascade, answer."""

    def __init__(self, teacher: DeploymentHandle, config: dict[str, Any] | None = None) -> None:
        _log_to_replica_log("records")
        self.teacher = teacher
        self.auth = AuthSettings.from_env()
        self.metrics = GatewayMetrics()
        self.cascade = Cascade(ServeTeacher(teacher), self.metrics, max_ongoing_requests=max_ongoing_requests)
        self.reconfigure(config or {})
        replica_state.gateway = self
        self.cascade.start()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve ``user_config``: a new ``GatewayConfig`` (thresholds, limits, budget, model), no restart."""
        self.cascade.reconfigure(GatewayConfig.model_validate(user_config))

    # -- what the middleware asks (serving.http.ReplicaFront) -------------------------------------------
    @property
    def limits(self) -> LimitSettings:
        return self.cascade.config.limits

    def authorized(self, headers: Headers) -> bool:
        return http.authorized(self.auth, headers)

    def refused(self, status: int) -> None:
        self.metrics.refused(status)

    def served_labels(self) -> list[str] | None:
        bundle = self.cascade.bundle
        return None if bundle is None else list(bundle.manifest.labels)

    # -- calling the cascade --------------------------------------------------------------------------
    def _overloaded(self, exc: Exception) -> ApiError:
        return ApiError(503, f"over capacity, retry later: {exc}",
                        headers={"Retry-After": str(self.limits.retry_after_s)})

    async def _classify(self, texts: list[str], route: Route, started: float) -> list[dict[str, Any]]:
        try:
            return await self.cascade.classify(texts, route, started)
        except Overloaded as exc:
            raise self._overloaded(exc) from exc

    async def _admit_then(self, handler: Callable[..., Awaitable[Response]], *args: Any) -> Response:
        """Admission (one limit, below Ray's) around a handler: a refusal is a fast JSON 503. The handlers map
        the cascade's own ``Overloaded`` themselves, so only the admission's reaches this one."""
        try:
            with self.cascade.admitted():
                return await handler(*args)
        except Overloaded as exc:
            raise self._overloaded(exc) from exc

    # -- v1 -------------------------------------------------------------------------------------------
    @api.post("/v1/classify", response_model=ClassifyResponse, openapi_extra=json_body(ClassifyRequest))
    async def classify(self, request: Request) -> Response:
        """Classify texts; `route` is auto (default), student or teacher."""
        return await self._admit_then(self._v1_classify, request, self.cascade.clock())

    async def _v1_classify(self, request: Request, started: float) -> Response:
        payload = http.parse_json(await http.read_body(request, self.limits))
        routes = [route.value for route in Route]  # a list: the client's value may be unhashable ({}, [])
        if isinstance(payload, dict) and "route" in payload and payload["route"] not in routes:
            raise ApiError(400, f"unknown route {payload['route']!r}; use one of {routes}")
        parsed = http.validated(ClassifyRequest, payload)
        http.check_texts(parsed.texts, self.limits)
        results = await self._classify(parsed.texts, parsed.route, started)
        return JSONResponse({"id": request.state.request_id, "results": results})

    @api.post("/v1/feedback", response_model=FeedbackResponse, openapi_extra=json_body(FeedbackRequest))
    async def feedback(self, request: Request) -> Response:
        """Texts with their true labels: queued as labelled records (they outrank the teacher in training) and
        counted in the live accuracy estimate. Same authentication, limits and errors as /v1/classify."""
        return await self._admit_then(self._v1_feedback, request)

    async def _v1_feedback(self, request: Request) -> Response:
        parsed = http.validated(FeedbackRequest, http.parse_json(await http.read_body(request, self.limits)))
        http.check_labelled(parsed.texts, parsed.labels, self.limits)
        try:
            queued = await self.cascade.feedback(parsed.texts, parsed.labels)
        except RejectedInput as exc:
            raise ApiError(422, str(exc)) from exc
        except Overloaded as exc:
            raise self._overloaded(exc) from exc
        except QueueFull as exc:
            raise ApiError(503, str(exc), headers={"Retry-After": str(self.limits.retry_after_s)}) from exc
        return JSONResponse({"id": request.state.request_id, "queued": queued})

    @api.get("/v1/status")
    async def status(self) -> dict[str, Any]:
        """What this replica serves now: bundle, live threshold, settings, teacher share."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, **self.cascade.status()}

    # -- Open Inference Protocol (KServe v2) ----------------------------------------------------------
    @api.get("/v2/health/live")
    async def live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self, request: Request) -> Response:
        """Ready when the student is loaded here and the teacher deployment answers. A remote teacher's server
        being down does not make the gateway unready (its deferred texts are answered degraded, not failed, and
        an unready pod would fail them all); ``teacher`` reports its state: kind, version, server ready, breaker."""
        try:
            teacher = await asyncio.wait_for(self.teacher.state.remote(), 3.0)
        except Exception as exc:
            teacher = {"version": None, "ready": False, "error": f"{type(exc).__name__}: {exc}"[:200]}
        ready = self.cascade.snapshot is not None and teacher.get("version") is not None
        return JSONResponse({"ready": ready, "teacher": teacher}, status_code=200 if ready else 503)

    @api.get("/v2", response_model=ServerMetadata)
    async def server_metadata(self) -> dict[str, Any]:
        return oip.server_metadata()

    @api.get("/v2/models/{name}", response_model=ModelMetadata)
    async def model_metadata(self, name: str) -> dict[str, Any]:
        self._model_route(name)
        bundle = self.cascade.bundle
        assert bundle is not None
        return oip.model_metadata(name, bundle.version, len(bundle.manifest.labels))

    @api.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str) -> dict[str, Any]:
        self._model_route(name)
        return {"name": name, "ready": self.cascade.snapshot is not None}

    @api.post("/v2/models/{name}/infer", response_model=InferResponse, openapi_extra=INFER_OPENAPI)
    async def infer(self, name: str, request: Request) -> Response:
        """KServe v2 inference with one BYTES input of texts, as JSON or binary tensor data."""
        route = self._model_route(name)
        return await self._admit_then(self._v2_infer, name, route, request, self.cascade.clock())

    @api.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata)
    async def model_version_metadata(self, name: str, version: str) -> dict[str, Any]:
        self._served_version(name, version)
        return await self.model_metadata(name)

    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def model_version_ready(self, name: str, version: str) -> dict[str, Any]:
        self._served_version(name, version)
        return await self.model_ready(name)

    @api.post("/v2/models/{name}/versions/{version}/infer", response_model=InferResponse, openapi_extra=INFER_OPENAPI)
    async def infer_version(self, name: str, version: str, request: Request) -> Response:
        self._served_version(name, version)
        return await self.infer(name, request)

    async def _v2_infer(self, name: str, route: Route, request: Request, started: float) -> Response:
        """Framing and encoding live in serving/oip.py; here: the limits and the cascade."""
        header, binary = oip.split_body(await http.read_body(request, self.limits),
                                        request.headers.get(oip.HEADER_LENGTH), request.headers.get("content-encoding"))
        call = oip.parse_request(http.parse_json(header), binary)
        http.check_texts(call.texts, self.limits)
        results = await self._classify(call.texts, route, started)
        # Version and label order from the answers themselves, so a model swap mid-request cannot mix them.
        first = results[0]
        encoded = oip.encode_response(name, first["student_version"], call.id or request.state.request_id,
                                      call.outputs, oip.output_values(results, list(first["probabilities"])))
        return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)

    def _served_version(self, name: str, version: str) -> None:
        self._model_route(name)
        served = self.cascade.bundle.version if self.cascade.bundle is not None else None
        if version != served:
            raise ApiError(404, f"model {name!r} has no version {version!r}; the served version is {served!r}",
                           {"served_version": served})

    @staticmethod
    def _model_route(name: str) -> Route:
        if name not in MODEL_ROUTES:
            raise ApiError(404, f"unknown model {name!r}; models: {sorted(MODEL_ROUTES)}")
        return MODEL_ROUTES[name]
