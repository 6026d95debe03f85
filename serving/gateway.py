"""The HTTP ingress: FastAPI on Ray Serve, with the int8 student inside the replica.

The student runs in the ingress replica itself, so a confident text never leaves it: one HTTP hop,
a batched ONNX Runtime call on a worker thread, and the answer. Only deferred texts cross to the
teacher deployment, under a concurrency cap, a traffic budget and a timeout.
"""


import asyncio
import hmac
import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

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

from bundle.registry import Bundle, Registry
from bundle.runtime import StudentRuntime
from records.queue import open_queue, teacher_answer_records
from records.writer import RecordWriter
from routing.confidence import ConfidenceMeasure, softmax
from routing.policy import DeferralPolicy, DegradedReason, Route, ShadowSampler, TeacherGate
from serving import replica_state
from serving.batching import OpportunisticBatcher
from serving.metrics import GatewayMetrics
from serving.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    InferRequest,
    InferResponse,
    ModelMetadata,
)
from serving.settings import AuthSettings, GatewayConfig, StudentSettings, queue_url

logger = logging.getLogger("ray.serve")

MODEL_ROUTES = {"cascade": Route.AUTO, "student": Route.STUDENT, "teacher": Route.TEACHER}
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
OPEN_PATHS = ("/v2/health/", "/docs", "/openapi.json", "/redoc")


class ApiError(Exception):
    """An error answered as JSON with a status code; raised anywhere in request handling."""

    def __init__(self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


api = FastAPI(
    title="Cascade",
    version="0.1.0",
    description="Distilled int8 student first; the teacher only when the student is unsure.",
    responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
               422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
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


def _count_refusal(status: int) -> None:
    gateway = replica_state.gateway
    if gateway is not None:
        gateway.metrics.refused(status)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    _count_refusal(exc.status)
    return _error(request, exc.status, exc.error, exc.detail, exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    _count_refusal(422)
    return _error(request, 422, "invalid request", json.loads(json.dumps(exc.errors(), default=str)))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    _count_refusal(exc.status_code)
    return _error(request, exc.status_code, str(exc.detail))


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


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat


def _result(bundle: Bundle, probs: np.ndarray, confidence: float, served_by: str, reason: str | None,
            teacher_version: str | None, degraded: bool = False) -> dict[str, Any]:
    """One answer of the v1 API."""
    labels = bundle.manifest.labels
    return {
        "label": labels[int(np.argmax(probs))],
        "probabilities": {label: float(p) for label, p in zip(labels, probs, strict=True)},
        "confidence": confidence,
        "served_by": served_by,
        "degraded": degraded,
        "reason": reason,
        "student_version": bundle.version,
        "teacher_version": teacher_version,
    }


@serve.ingress(api)
class Gateway:
    """Ingress replica: HTTP API, student inference, deferral, teacher protection."""

    def __init__(self, teacher: DeploymentHandle, config: dict[str, Any] | None = None) -> None:
        self.teacher = teacher
        self.config = GatewayConfig()
        self.auth = AuthSettings.from_env()
        self.bundle: Bundle | None = None
        self.student: StudentRuntime | None = None
        self.policy: DeferralPolicy | None = None
        self.gate = TeacherGate(0, 0.0)
        self.shadow = ShadowSampler(0.0)
        self.writer: RecordWriter | None = None
        self._writer_url: str | None = None
        self._background: set[asyncio.Task] = set()
        self.in_flight = 0
        self.shadow_sent = 0
        self.shadow_agreed = 0
        self.metrics = GatewayMetrics()
        self._swap_lock = threading.Lock()
        # One worker thread: ONNX Runtime work leaves the event loop, which keeps accepting
        # requests (and filling the next batch) while a batch runs.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="student")
        defaults = StudentSettings()
        self._student_batcher = OpportunisticBatcher(self._student_batch, defaults.max_batch_size,
                                                     defaults.batch_wait_timeout_s)
        self.reconfigure(config or {})
        replica_state.gateway = self
        threading.Thread(target=self._follow_current, name="cascade-follow-current", daemon=True).start()

    # -- configuration -------------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new ``GatewayConfig`` (Serve ``user_config``): thresholds, limits, budget, model."""
        config = GatewayConfig.model_validate(user_config)
        self._use_bundle(Registry(config.model.home).load(config.model.version), config)
        teacher = config.teacher
        self.gate.configure(teacher.max_concurrency, teacher.max_share, teacher.max_texts_per_s,
                            teacher.budget_window_s)
        self.shadow = ShadowSampler(config.shadow.share)
        self._student_batcher.max_batch_size = config.student.max_batch_size
        self._student_batcher.wait_s = config.student.batch_wait_timeout_s
        url = queue_url(config)
        if url != self._writer_url:
            old = self.writer
            self.writer = RecordWriter(lambda: open_queue(url), config.queue.buffer_size, config.queue.flush_interval_s,
                                       retention=config.queue.retention)
            self._writer_url = url
            if old is not None:
                threading.Thread(target=old.close, daemon=True).start()
        self.config = config

    def _use_bundle(self, bundle: Bundle, config: GatewayConfig) -> None:
        """Swap student, bundle and policy together; requests in flight finish on the objects they hold."""
        with self._swap_lock:
            student = self.student
            if (student is None or self.bundle is None or bundle.version != self.bundle.version
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
            self.student, self.bundle, self.policy = student, bundle, policy

    def _follow_current(self) -> None:
        """Swap to a newly promoted (or rolled back) version; loading happens off the event loop."""
        while True:
            time.sleep(self.config.model.poll_interval_s)
            self._publish_state()
            config = self.config
            if config.model.version is not None:
                continue
            try:
                current = Registry(config.model.home).current_version()
                if current and self.bundle is not None and current != self.bundle.version:
                    self._use_bundle(Registry(config.model.home).load(current), config)
            except Exception as exc:  # a bad promotion keeps the running model
                logger.error("not swapping to the new current model: %s", exc)

    def _publish_state(self) -> None:
        """Gauges and queue counters, refreshed on the follow thread's beat (never on the request path)."""
        bundle, policy, writer = self.bundle, self.policy, self.writer
        if bundle is None or policy is None:
            return
        self.metrics.set_models(bundle.version, bundle.teacher_version)
        self.metrics.routing_state(policy.threshold, self.gate.share(), self.config.teacher.max_share)
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
    async def _student_batch(self, texts: list[str]) -> list[np.ndarray]:
        student = self.student
        assert student is not None
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        logits = await loop.run_in_executor(self._executor, student.logits, texts)
        self.metrics.student.call(len(texts), time.perf_counter() - started)
        return list(logits)

    async def _student_answer(self, texts: list[str]) -> np.ndarray:
        """Student logits. A lone one-text request runs inline: with nothing else in flight there is
        nothing to batch with and no one for the event loop to serve meanwhile, and the batch queue and
        worker-thread hop were the largest fixed costs on that path (docs/performance.md). Under load,
        texts are batched on the worker thread so the event loop keeps accepting."""
        student = self.student
        assert student is not None
        if len(texts) == 1 and self.in_flight <= 1:
            # One turn of the loop first: requests that arrived together start and count themselves
            # in, so a burst goes to the batch queue instead of running one by one on the loop.
            await asyncio.sleep(0)
        if len(texts) == 1 and self.in_flight <= 1:
            started = time.perf_counter()
            logits = student.logits(texts)
            self.metrics.student.call(1, time.perf_counter() - started)
            return logits
        return np.stack(await asyncio.gather(*(self._student_batcher(t) for t in texts)))

    async def _ask_teacher(self, texts: list[str], enforce_budget: bool) -> tuple[np.ndarray | None, str | None,
                                                                                   DegradedReason | None]:
        refusal = self.gate.try_acquire(len(texts), enforce_budget)
        if refusal is not None:
            return None, None, refusal
        try:
            answer = await asyncio.wait_for(self.teacher.classify.remote(texts), self.config.teacher.timeout_s)
            return np.asarray(answer["logits"], dtype=np.float64), answer["version"], None
        except TimeoutError:
            return None, None, DegradedReason.TIMEOUT
        except Exception as exc:  # any failure of the teacher degrades, never fails, the request
            logger.warning("teacher call failed: %s: %s", type(exc).__name__, exc)
            return None, None, DegradedReason.ERROR
        finally:
            self.gate.release()

    async def classify_texts(self, texts: list[str], route: Route) -> list[dict[str, Any]]:
        bundle, policy = self.bundle, self.policy
        assert bundle is not None and policy is not None
        teacher_version, reason = bundle.teacher_version, None
        if route is Route.TEACHER:
            # Forced teacher: the student is not run unless the teacher fails (then it answers, degraded),
            # so "teacher only" costs what the teacher alone costs.
            teacher_logits, version, reason = await self._ask_teacher(texts, enforce_budget=False)
            if teacher_logits is not None:
                probs = softmax(teacher_logits, bundle.manifest.temperatures.teacher)
                return [_result(bundle, row, float(np.max(row)), "teacher", None, version or teacher_version)
                        for row in probs]
        logits = await self._student_answer(texts)
        decisions = policy.decide(logits, route)
        for decision in decisions:
            self.metrics.confidence.observe(decision.confidence)
        if route is Route.AUTO:
            self.gate.observe(len(texts))
        deferred = [i for i, d in enumerate(decisions) if d.to_teacher]
        teacher_probs: np.ndarray | None = None
        if deferred and route is Route.AUTO:
            teacher_logits, version, reason = await self._ask_teacher([texts[i] for i in deferred], enforce_budget=True)
            if teacher_logits is not None:
                teacher_probs = softmax(teacher_logits, bundle.manifest.temperatures.teacher)
                teacher_version = version or teacher_version
                self._record([texts[i] for i in deferred], np.stack([decisions[i].probabilities for i in deferred]),
                             teacher_probs, bundle, teacher_version, "fallback")
        if route is Route.AUTO:
            shadowed = self.shadow.pick([i for i, d in enumerate(decisions) if not d.to_teacher])
            if shadowed:
                self._spawn(self._shadow([texts[i] for i in shadowed],
                                         np.stack([decisions[i].probabilities for i in shadowed]), bundle))
        results = []
        teacher_row = {index: row for row, index in enumerate(deferred)}
        for i, decision in enumerate(decisions):
            if i in teacher_row and teacher_probs is not None:
                probs = teacher_probs[teacher_row[i]]
                results.append(_result(bundle, probs, float(np.max(probs)), "teacher", None, teacher_version))
            else:
                why = (reason.value if reason else None) if i in teacher_row else None
                results.append(_result(bundle, decision.probabilities, decision.confidence, "student",
                                       why, teacher_version, degraded=i in teacher_row))
        return results

    # -- the loop back to distillation -----------------------------------------------------------
    def _record(self, texts: list[str], student_probs: np.ndarray, teacher_probs: np.ndarray, bundle: Bundle,
                teacher_version: str, reason: Literal["fallback", "shadow"]) -> None:
        """Hand the teacher's answers to the queue writer; never blocks (a full buffer is counted)."""
        disagreements = int((student_probs.argmax(-1) != teacher_probs.argmax(-1)).sum())
        if disagreements:
            self.metrics.disagreements.inc(disagreements, tags={"source": reason})
        writer = self.writer
        if writer is None:
            return
        for record in teacher_answer_records(texts, student_probs, teacher_probs, bundle.version, teacher_version,
                                             reason, self.config.queue.keep):
            writer.submit(record)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shadow(self, texts: list[str], student_probs: np.ndarray, bundle: Bundle) -> None:
        """Ask the teacher about texts the student already answered; the request has gone."""
        teacher_logits, version, _ = await self._ask_teacher(texts, enforce_budget=True)
        if teacher_logits is None:
            return
        teacher_probs = softmax(teacher_logits, bundle.manifest.temperatures.teacher)
        agreed = int((teacher_probs.argmax(-1) == student_probs.argmax(-1)).sum())
        self.shadow_sent += len(texts)
        self.shadow_agreed += agreed
        self.metrics.shadowed(len(texts), agreed, self.config.cost)
        self._record(texts, student_probs, teacher_probs, bundle, version or bundle.teacher_version, "shadow")

    def _answered(self, results: list[dict[str, Any]], started: float) -> None:
        teacher_texts = sum(1 for r in results if r["served_by"] == "teacher")
        self.metrics.answered(results, time.perf_counter() - started, self.config.cost, teacher_texts)

    def _admit(self) -> None:
        if self.in_flight >= self.config.limits.max_in_flight:
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

    async def _read_json(self, request: Request) -> Any:
        body = await request.body()
        if len(body) > self.config.limits.max_body_bytes:
            raise ApiError(413, f"request body over {self.config.limits.max_body_bytes} bytes")
        if not body:
            raise ApiError(422, "empty request body: expected a JSON object")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"body is not valid JSON: {exc}") from exc

    # -- v1 -----------------------------------------------------------------------------------
    @api.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(self, request: Request) -> Response:
        """Classify texts; `route` is auto (default), student or teacher."""
        started = time.perf_counter()
        self._admit()
        self.in_flight += 1
        try:
            payload = await self._read_json(request)
            if isinstance(payload, dict) and "route" in payload and payload["route"] not in set(Route):
                raise ApiError(400, f"unknown route {payload['route']!r}; use one of {[r.value for r in Route]}")
            try:
                parsed = ClassifyRequest.model_validate(payload)
            except ValidationError as exc:
                raise ApiError(422, "invalid request",
                               json.loads(exc.json(include_url=False, include_input=False))) from exc
            self._check_texts(parsed.texts)
            results = await self.classify_texts(parsed.texts, parsed.route)
            self._answered(results, started)
            request_id = request.state.request_id
            logger.debug("request %s: %d texts, route %s", request_id, len(parsed.texts), parsed.route.value)
            return JSONResponse({"id": request_id, "results": results})
        finally:
            self.in_flight -= 1

    @api.get("/v1/status")
    async def status(self) -> dict[str, Any]:
        """What this replica serves now: bundle, live threshold, settings, teacher share."""
        assert self.bundle is not None and self.policy is not None
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "student_version": self.bundle.version,
            "threshold": self.policy.threshold,
            "confidence_measure": self.policy.measure.value,
            "teacher_share": self.gate.share(),
            "in_flight": self.in_flight,
            "shadow": {"texts": self.shadow_sent, "agreed": self.shadow_agreed},
            "queue": None if self.writer is None else {"written": self.writer.written, "dropped": self.writer.dropped,
                                                       "retried": self.writer.retried, "backlog": self.writer.backlog},
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
        ready = self.student is not None and teacher.get("version") is not None
        return JSONResponse({"ready": ready, "teacher": teacher}, status_code=200 if ready else 503)

    @api.get("/v2/models/{name}", response_model=ModelMetadata)
    async def model_metadata(self, name: str) -> dict[str, Any]:
        self._model_route(name)
        assert self.bundle is not None
        return {
            "name": name,
            "versions": [self.bundle.version],
            "platform": "cascade" if name == "cascade" else ("onnxruntime" if name == "student" else "pytorch"),
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.bundle.manifest.labels)]},
                {"name": "served_by", "datatype": "BYTES", "shape": [-1]},
                {"name": "degraded", "datatype": "BOOL", "shape": [-1]},
            ],
        }

    @api.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str) -> dict[str, Any]:
        self._model_route(name)
        return {"name": name, "ready": self.student is not None}

    @api.post("/v2/models/{name}/infer", response_model=InferResponse)
    async def infer(self, name: str, request: Request) -> Response:
        """KServe v2 inference with one BYTES input of texts."""
        started = time.perf_counter()
        route = self._model_route(name)
        self._admit()
        self.in_flight += 1
        try:
            try:
                parsed = InferRequest.model_validate(await self._read_json(request))
            except ValidationError as exc:
                raise ApiError(422, "invalid request",
                               json.loads(exc.json(include_url=False, include_input=False))) from exc
            tensor = parsed.inputs[0]
            if len(parsed.inputs) != 1 or tensor.datatype != "BYTES":
                raise ApiError(422, "expected exactly one input tensor with datatype BYTES")
            texts = _flatten(tensor.data)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ApiError(422, "input data must be a non-empty list of strings")
            self._check_texts(texts)
            results = await self.classify_texts(texts, route)
            self._answered(results, started)
            assert self.bundle is not None
            n, labels = len(results), self.bundle.manifest.labels
            outputs = [
                {"name": "label", "datatype": "BYTES", "shape": [n], "data": [r["label"] for r in results]},
                {"name": "probabilities", "datatype": "FP32", "shape": [n, len(labels)],
                 "data": [r["probabilities"][label] for r in results for label in labels]},
                {"name": "served_by", "datatype": "BYTES", "shape": [n], "data": [r["served_by"] for r in results]},
                {"name": "degraded", "datatype": "BOOL", "shape": [n], "data": [r["degraded"] for r in results]},
            ]
            return JSONResponse({"model_name": name, "model_version": self.bundle.version,
                                 "id": parsed.id or request.state.request_id, "outputs": outputs})
        finally:
            self.in_flight -= 1

    def _model_route(self, name: str) -> Route:
        if name not in MODEL_ROUTES:
            raise ApiError(404, f"unknown model {name!r}; models: {sorted(MODEL_ROUTES)}")
        return MODEL_ROUTES[name]
