"""The HTTP ingress: FastAPI on Ray Serve, with the int8 student inside the replica.

The student runs in the ingress replica itself, so a confident text never leaves it: one HTTP hop,
a batched ONNX Runtime call on a worker thread, and the answer. Only deferred texts cross to the
teacher deployment, under a concurrency cap, a traffic budget and a timeout.
"""


import asyncio
import dataclasses
import hmac
import json
import logging
import logging.handlers
import re
import threading
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.context import _get_serve_request_context
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from bundle.registry import MANIFEST, STUDENT_FILES, Bundle, Registry
from bundle.runtime import StudentRuntime
from records.queue import open_queue
from records.writer import RecordWriter
from routing.confidence import ConfidenceMeasure
from routing.controller import ControllerStep, ThresholdController
from routing.policy import DeferralPolicy, Route
from serving import oip, replica_state
from serving.cascade import CascadeRouter, Overloaded, Snapshot
from serving.metrics import GatewayMetrics
from serving.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ServerMetadata,
    json_body,
)
from serving.settings import AuthSettings, GatewayConfig, queue_url

logger = logging.getLogger("ray.serve")

MODEL_ROUTES = {"cascade": Route.AUTO, "student": Route.STUDENT, "teacher": Route.TEACHER}
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
OPEN_PATHS = ("/v2/health/", "/docs", "/openapi.json", "/redoc")
MAX_JSON_DEPTH = 64  # far deeper than any valid request; Python's json recurses and fails near 1,000
# The v2 infer routes read their own body (JSON, or the binary tensor data extension) and may answer in binary.
INFER_OPENAPI = {**json_body(InferRequest), "responses": {"200": {
    "content": {oip.BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    "headers": {oip.HEADER_LENGTH: {"description": "Bytes of the JSON header before the binary outputs (only when "
                                                   "an output was asked for as binary data)",
                                    "schema": {"type": "string"}}}}}}


class ApiError(Exception):
    """An error answered as JSON with a status code; raised anywhere in request handling."""

    def __init__(self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


api = FastAPI(
    title="Cascade",
    version="0.1.0",
    description="Distilled int8 student first; the teacher only when the student is unsure.",
    # Every answer the routes give, each with the JSON error body (schemathesis checks the document against them).
    responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse},
               404: {"model": ErrorResponse, "description": "Unknown model name or version"},
               405: {"model": ErrorResponse, "description": "Method not allowed",
                     "headers": {"Allow": {"description": "Methods this path accepts", "schema": {"type": "string"}}}},
               413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
               503: {"model": ErrorResponse, "description": "Over capacity: retry after the given seconds",
                     "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}}}},
)


def _error_response(request_id: str, status: int, error: str, detail: Any = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, "id": request_id}, status_code=status, headers=headers)


def _error(request: Request, status: int, error: str, detail: Any = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    request_id = request.scope.get("state", {}).get("request_id") or _request_id(request.headers)
    return _error_response(request_id, status, error, detail, headers)


def _request_id(headers: Headers) -> str:
    """Serve's own request id: it honours a client's X-Request-ID, and Serve returns it as a header
    and writes it on every replica log line, so body, header and logs agree."""
    serve_id = _get_serve_request_context().request_id
    if serve_id:
        return serve_id
    supplied = headers.get("x-request-id", "")
    return supplied if REQUEST_ID.match(supplied) else uuid.uuid4().hex


def _log_to_replica_log(*names: str) -> None:
    """Send the warnings of the rooms a replica runs (the queue writer's "disk is full") to the replica's log.

    Serve writes only its own logger ("ray.serve", which does not propagate) to the replica's log file, and the
    fast path turns its stderr off, so any other logger's records were lost without a trace. Serve buffers its
    request-path records (a MemoryHandler flushed every 1,000 records or on an error); these are rare and must be
    seen when they happen, so they go straight to the file behind the buffer (no request context to add).
    """
    for name in names:
        room = logging.getLogger(name)
        for handler in logging.getLogger("ray.serve").handlers:
            if isinstance(handler, logging.handlers.MemoryHandler) and handler.target is not None:
                handler = handler.target
            if handler not in room.handlers:
                room.addHandler(handler)
        room.propagate = False


def _count_refusal(status: int) -> None:
    gateway = replica_state.gateway
    if gateway is not None:
        gateway.metrics.refused(status)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    _count_refusal(exc.status)
    return _error(request, exc.status, exc.error, exc.detail, exc.headers)


@api.exception_handler(oip.ProtocolError)
async def _protocol_error(request: Request, exc: oip.ProtocolError) -> JSONResponse:
    _count_refusal(exc.status)
    return _error(request, exc.status, exc.error, exc.detail)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    _count_refusal(422)
    return _error(request, 422, "invalid request", json.loads(json.dumps(exc.errors(), default=str)))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    _count_refusal(exc.status_code)
    # Starlette's own headers (405's Allow) are part of the answer (RFC 9110); dropping them broke the contract.
    return _error(request, exc.status_code, str(exc.detail), headers=exc.headers)


class RequestContextMiddleware:
    """Request id, API key check and a hard limit on the declared body size, before any routing.

    Pure ASGI on purpose: Starlette's ``@app.middleware("http")`` wraps every request in extra tasks
    and streams, a measurable cost on a path that must stay near a millisecond.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = _request_id(headers)
        scope.setdefault("state", {})["request_id"] = request_id
        gateway = replica_state.gateway
        refusal: JSONResponse | None = None
        if gateway is not None:
            declared = headers.get("content-length", "")
            limit = gateway.config.limits.max_body_bytes
            if not scope["path"].startswith(OPEN_PATHS) and not gateway.authorized(headers):
                refusal = _error_response(request_id, 401, "missing or invalid API key",
                                          headers={"WWW-Authenticate": "Bearer"})
            elif declared.isdigit() and int(declared) > limit:
                refusal = _error_response(request_id, 413, f"request body over {limit} bytes")
        if refusal is not None:
            _count_refusal(refusal.status_code)
            await refusal(scope, receive, send)
        else:
            await self.app(scope, receive, send)


api.add_middleware(RequestContextMiddleware)


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``body`` nests arrays or objects deeper than ``limit``, found by one iterative scan that
    skips string contents: ``json.loads`` recurses and would raise RecursionError (an HTTP 500) on a
    body of 100,000 brackets, and no well-kept parser offers a depth limit at the stdlib's speed."""
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


@serve.ingress(api)
class Gateway:
    """Ingress replica: HTTP API, student inference, deferral, teacher protection."""

    def __init__(self, teacher: DeploymentHandle, config: dict[str, Any] | None = None) -> None:
        _log_to_replica_log("records")
        self.teacher = teacher
        self.config = GatewayConfig.model_validate(config or {})
        self.auth = AuthSettings.from_env()
        self.metrics = GatewayMetrics()
        self.router = CascadeRouter(self._call_teacher, self.config, self.metrics)
        self._writer_url: str | None = None
        self._swap_lock = threading.Lock()
        self._controlled_at = time.monotonic()
        self._controller_step: ControllerStep | None = None
        self.reconfigure(config or {})
        replica_state.gateway = self
        threading.Thread(target=self._follow_current, name="cascade-follow-current", daemon=True).start()

    async def _call_teacher(self, texts: list[str]) -> tuple[np.ndarray, str | None]:
        """The Teacher deployment behind the Serve handle; logits cross as a numpy array."""
        answer = await self.teacher.classify.remote(texts)
        return np.asarray(answer["logits"], dtype=np.float64), answer["version"]

    # What the rest of the class and the v2 routes read; the router holds the one snapshot.
    @property
    def bundle(self) -> Bundle | None:
        snapshot = self.router.snapshot
        return None if snapshot is None else snapshot.bundle

    @property
    def policy(self) -> DeferralPolicy | None:
        snapshot = self.router.snapshot
        return None if snapshot is None else snapshot.policy

    @property
    def in_flight(self) -> int:
        return self.router.in_flight

    # -- configuration -------------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new ``GatewayConfig`` (Serve ``user_config``): thresholds, limits, budget, model."""
        config = GatewayConfig.model_validate(user_config)
        config.limits.admission_limit(self._max_ongoing_requests())  # refuse a headroom Ray's limit leaves no room for
        self._use_bundle(Registry(config.model.home).load(config.model.version, verify=STUDENT_FILES), config)
        self.router.configure(config)
        url = queue_url(config.queue.url, config.model.home)
        if url != self._writer_url:
            old = self.router.writer
            self.router.writer = RecordWriter(lambda: open_queue(url), config.queue.buffer_size,
                                              config.queue.flush_interval_s, retention=config.queue.retention)
            self._writer_url = url
            if old is not None:
                threading.Thread(target=old.close, daemon=True).start()
        self.config = config

    @staticmethod
    def _max_ongoing_requests() -> int:
        """This deployment's live ``max_ongoing_requests`` (Serve updates the context on a config change)."""
        from ray.serve.context import _get_internal_replica_context

        context = _get_internal_replica_context()
        if context is None:  # constructed outside a Serve replica
            from serving.deployment import DEPLOYMENT_OPTIONS

            return int(DEPLOYMENT_OPTIONS["Gateway"]["max_ongoing_requests"])
        return int(context._deployment_config.max_ongoing_requests)

    def _use_bundle(self, bundle: Bundle, config: GatewayConfig) -> None:
        """Swap student, bundle and policy together as one frozen snapshot; requests in flight finish
        on the snapshot they took."""
        with self._swap_lock:
            current = self.router.snapshot
            student = None if current is None else current.student
            if (not isinstance(student, StudentRuntime) or current is None or bundle.version != current.bundle.version
                    or student.threads != config.student.threads):
                student = StudentRuntime(bundle.student_path, bundle.tokenizer_dir, bundle.manifest.max_length,
                                         config.student.threads)
                logger.info("gateway serving student %s", bundle.version)
            manifest = bundle.manifest
            policy = DeferralPolicy(
                threshold=config.routing.threshold if config.routing.threshold is not None else manifest.threshold,
                temperature=manifest.temperatures.student,
                measure=config.routing.confidence_measure or ConfidenceMeasure(manifest.confidence_measure),
            )
            self.router.snapshot = Snapshot(bundle, student, policy)

    def _follow_current(self) -> None:
        """Swap to a newly promoted (or rolled back) version; loading happens off the event loop."""
        while True:
            time.sleep(self.config.model.poll_interval_s)
            self._publish_state()
            self._control_threshold()
            config = self.config
            if config.model.version is not None:
                continue
            try:
                current = Registry(config.model.home).current_version()
                bundle = self.bundle
                # A new version, or the same version with a rewritten manifest (`cascade calibrate` saves
                # a new threshold through Registry.save_manifest): both swap, the latter without reloading
                # the student (same version, same threads).
                if current and bundle is not None and (current != bundle.version
                                                       or self._manifest_changed(bundle)):
                    self._use_bundle(Registry(config.model.home).load(current, verify=STUDENT_FILES), config)
            except Exception as exc:  # a bad promotion keeps the running model
                logger.error("not swapping to the new current model: %s", exc)

    def _control_threshold(self) -> None:
        """``routing.target_agreement``: every ``controller.interval_s``, move the threshold toward the cheapest one
        that holds the target on this replica's recent answers (routing/controller.py). Answers of another student
        or teacher version are not evidence about this one; a swap starts again from the bundle's threshold."""
        routing = self.config.routing
        if routing.target_agreement is None or time.monotonic() - self._controlled_at < routing.controller.interval_s:
            return
        self._controlled_at = time.monotonic()
        settings = routing.controller
        controller = ThresholdController(routing.target_agreement, **settings.model_dump(exclude={"interval_s"}))
        with self._swap_lock:
            snapshot = self.router.snapshot
            if snapshot is None:
                return
            evidence = self.router.evidence.evidence()
            if evidence is not None and (evidence.student_version, evidence.teacher_version) != (
                    snapshot.bundle.version, snapshot.bundle.teacher_version):
                evidence = None
            step = controller.step(snapshot.policy.threshold, evidence)
            self._controller_step = step
            self.metrics.controller(step.wanted)
            if step.threshold != snapshot.policy.threshold:
                policy = dataclasses.replace(snapshot.policy, threshold=step.threshold)
                self.router.snapshot = Snapshot(snapshot.bundle, snapshot.student, policy)
                logger.info("threshold %.4f -> %.4f (target agreement %.3f; %s)", snapshot.policy.threshold,
                            step.threshold, routing.target_agreement, step.reason)

    @staticmethod
    def _manifest_changed(bundle: Bundle) -> bool:
        """The served version's manifest on disk differs from the one loaded (one small file read per beat)."""
        try:
            return type(bundle.manifest).model_validate_json((bundle.path / MANIFEST).read_text()) != bundle.manifest
        except (OSError, ValueError):
            return False

    def _publish_state(self) -> None:
        """Gauges and queue counters, refreshed on the follow thread's beat (never on the request path)."""
        snapshot, writer = self.router.snapshot, self.router.writer
        if snapshot is None:
            return
        self.metrics.set_models(snapshot.bundle.version, snapshot.bundle.teacher_version)
        self.metrics.routing_state(snapshot.policy.threshold, self.router.gate.share(), self.config.teacher.max_share)
        self.metrics.breaker(self.router.breaker.state)
        self.metrics.live_estimates(*self.router.evidence.estimate())
        if writer is not None:
            self.metrics.queue_counters(writer.written, writer.dropped, writer.retried, writer.backlog)

    def authorized(self, headers: Headers) -> bool:
        if self.auth.api_key is None:
            return True
        header = headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        expected = self.auth.api_key.get_secret_value().encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)

    # -- inference ----------------------------------------------------------------------------
    async def classify_texts(self, texts: list[str], route: Route, started: float | None = None
                             ) -> list[dict[str, Any]]:
        """The cascade for one request (``serving.cascade``); a request shed past its queue deadline is a 503."""
        try:
            return await self.router.classify_texts(texts, route, started)
        except Overloaded as exc:
            raise ApiError(503, f"over capacity, retry later: {exc}",
                           headers={"Retry-After": str(self.config.limits.retry_after_s)}) from exc

    def _answered(self, results: list[dict[str, Any]], started: float) -> None:
        teacher_texts = sum(1 for r in results if r["served_by"] == "teacher")
        self.metrics.answered(results, time.perf_counter() - started, self.config.cost, teacher_texts)

    def _admit(self) -> None:
        """One admission limit, below Ray's ``max_ongoing_requests``: our JSON 503 fires first."""
        if self.router.in_flight >= self.config.limits.admission_limit(self._max_ongoing_requests()):
            retry = str(self.config.limits.retry_after_s)
            raise ApiError(503, "over capacity, retry later", headers={"Retry-After": retry})

    def _check_texts(self, texts: list[str]) -> None:
        limits = self.config.limits
        if len(texts) > limits.max_texts:
            raise ApiError(422, f"too many texts: {len(texts)} > {limits.max_texts} per request")
        for index, text in enumerate(texts):
            if not text.strip():
                raise ApiError(422, f"texts[{index}] is empty")
            if len(text) > limits.max_chars:
                raise ApiError(422, f"texts[{index}] has {len(text)} characters, over {limits.max_chars}")

    def _check_feedback(self, parsed: FeedbackRequest) -> None:
        """The texts, and one label per text (label names are checked against the served bundle afterwards)."""
        self._check_texts(parsed.texts)
        if len(parsed.labels) != len(parsed.texts):
            raise ApiError(422, f"{len(parsed.texts)} texts but {len(parsed.labels)} labels: give one label per text")

    async def _read_body(self, request: Request) -> bytes:
        body = await request.body()
        if len(body) > self.config.limits.max_body_bytes:
            raise ApiError(413, f"request body over {self.config.limits.max_body_bytes} bytes")
        if not body:
            raise ApiError(422, "empty request body: expected a JSON object")
        return body

    def _parse_json(self, body: bytes) -> Any:
        """The one JSON parser of request bodies (the v2 binary extension parses only its JSON header).
        Nesting is bounded first, so a deeply nested body is a 400, never a RecursionError (500)."""
        if json_depth_exceeds(body):
            raise ApiError(400, f"body nests JSON deeper than {MAX_JSON_DEPTH} levels")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"body is not valid JSON: {exc}") from exc

    async def _read_json(self, request: Request) -> Any:
        return self._parse_json(await self._read_body(request))

    # -- v1 -----------------------------------------------------------------------------------
    @api.post("/v1/classify", response_model=ClassifyResponse, openapi_extra=json_body(ClassifyRequest))
    async def classify(self, request: Request) -> Response:
        """Classify texts; `route` is auto (default), student or teacher."""
        started = time.perf_counter()
        self._admit()
        self.router.in_flight += 1
        try:
            payload = await self._read_json(request)
            routes = [route.value for route in Route]  # a list: the client's value may be unhashable ({}, [])
            if isinstance(payload, dict) and "route" in payload and payload["route"] not in routes:
                raise ApiError(400, f"unknown route {payload['route']!r}; use one of {routes}")
            try:
                parsed = ClassifyRequest.model_validate(payload)
            except ValidationError as exc:
                raise ApiError(422, "invalid request",
                               json.loads(exc.json(include_url=False, include_input=False))) from exc
            self._check_texts(parsed.texts)
            results = await self.classify_texts(parsed.texts, parsed.route, started)
            self._answered(results, started)
            request_id = request.state.request_id
            logger.debug("request %s: %d texts, route %s", request_id, len(parsed.texts), parsed.route.value)
            return JSONResponse({"id": request_id, "results": results})
        finally:
            self.router.in_flight -= 1

    @api.post("/v1/feedback", response_model=FeedbackResponse, openapi_extra=json_body(FeedbackRequest))
    async def feedback(self, request: Request) -> Response:
        """Texts with their true labels: queued as labelled records (they outrank the teacher in training) and
        counted in the live accuracy estimate. Same authentication, limits and errors as /v1/classify."""
        self._admit()
        self.router.in_flight += 1
        try:
            try:
                parsed = FeedbackRequest.model_validate(await self._read_json(request))
            except ValidationError as exc:
                raise ApiError(422, "invalid request",
                               json.loads(exc.json(include_url=False, include_input=False))) from exc
            self._check_feedback(parsed)
            assert self.bundle is not None
            names = self.bundle.manifest.labels
            unknown = sorted({label for label in parsed.labels if label not in names})
            if unknown:
                raise ApiError(422, f"unknown labels {unknown}; labels: {names}")
            try:
                queued = await self.router.feedback(parsed.texts, [names.index(label) for label in parsed.labels])
            except Overloaded as exc:
                raise ApiError(503, f"over capacity, retry later: {exc}",
                               headers={"Retry-After": str(self.config.limits.retry_after_s)}) from exc
            if queued < len(parsed.texts):
                raise ApiError(503, f"queue buffer full: {queued} of {len(parsed.texts)} texts queued, send the "
                               "rest again later", headers={"Retry-After": str(self.config.limits.retry_after_s)})
            return JSONResponse({"id": request.state.request_id, "queued": queued})
        finally:
            self.router.in_flight -= 1

    @api.get("/v1/status")
    async def status(self) -> dict[str, Any]:
        """What this replica serves now: bundle, live threshold, settings, teacher share."""
        assert self.bundle is not None and self.policy is not None
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "student_version": self.bundle.version,
            "threshold": self.policy.threshold,
            "threshold_controller": None if self.config.routing.target_agreement is None or (
                step := self._controller_step) is None else dataclasses.asdict(step),
            "confidence_measure": self.policy.measure.value,
            "teacher_share": self.router.gate.share(),
            "teacher_breaker": self.router.breaker.state.value,
            "in_flight": self.in_flight,
            "admission_limit": self.config.limits.admission_limit(self._max_ongoing_requests()),
            "shadow": {"texts": self.router.shadow_sent, "agreed": self.router.shadow_agreed},
            "queue": None if (writer := self.router.writer) is None else {
                "written": writer.written, "dropped": writer.dropped, "retried": writer.retried,
                "backlog": writer.backlog},
            "config": self.config.model_dump(mode="json"),
        }

    # -- Open Inference Protocol (KServe v2) ----------------------------------------------------
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
        ready = self.router.snapshot is not None and teacher.get("version") is not None
        return JSONResponse({"ready": ready, "teacher": teacher}, status_code=200 if ready else 503)

    @api.get("/v2", response_model=ServerMetadata)
    async def server_metadata(self) -> dict[str, Any]:
        return oip.server_metadata()

    @api.get("/v2/models/{name}", response_model=ModelMetadata)
    async def model_metadata(self, name: str) -> dict[str, Any]:
        self._model_route(name)
        assert self.bundle is not None
        return {
            "name": name,
            "versions": [self.bundle.version],
            "platform": "cascade" if name == "cascade" else ("onnxruntime" if name == "student" else "pytorch"),
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": output, "datatype": datatype,
                         "shape": [-1, len(self.bundle.manifest.labels)] if output == "probabilities" else [-1]}
                        for output, datatype in oip.OUTPUTS.items()],
        }

    @api.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str) -> dict[str, Any]:
        self._model_route(name)
        return {"name": name, "ready": self.router.snapshot is not None}

    @api.post("/v2/models/{name}/infer", response_model=InferResponse, openapi_extra=INFER_OPENAPI)
    async def infer(self, name: str, request: Request) -> Response:
        """KServe v2 inference with one BYTES input of texts, as JSON or binary tensor data."""
        return await self._infer(name, request)

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
        return await self._infer(name, request)

    async def _infer(self, name: str, request: Request) -> Response:
        """Framing and encoding live in serving/oip.py; here: admission, the limits, and the cascade."""
        started = time.perf_counter()
        route = self._model_route(name)
        self._admit()
        self.router.in_flight += 1
        try:
            header, binary = oip.split_body(await self._read_body(request), request.headers.get(oip.HEADER_LENGTH),
                                             request.headers.get("content-encoding"))
            call = oip.parse_request(self._parse_json(header), binary)
            self._check_texts(call.texts)
            results = await self.classify_texts(call.texts, route, started)
            self._answered(results, started)
            # Version and label order from the answers themselves, so a model swap mid-request cannot mix them.
            first = results[0]
            encoded = oip.encode_response(name, first["student_version"], call.id or request.state.request_id,
                                          call.outputs, oip.output_values(results, list(first["probabilities"])))
            return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)
        finally:
            self.router.in_flight -= 1

    def _served_version(self, name: str, version: str) -> None:
        self._model_route(name)
        served = self.bundle.version if self.bundle is not None else None
        if version != served:
            raise ApiError(404, f"model {name!r} has no version {version!r}; the served version is {served!r}",
                           {"served_version": served})

    def _model_route(self, name: str) -> Route:
        if name not in MODEL_ROUTES:
            raise ApiError(404, f"unknown model {name!r}; models: {sorted(MODEL_ROUTES)}")
        return MODEL_ROUTES[name]
