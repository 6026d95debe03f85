"""The HTTP side of the gateway, apart from its routes: the FastAPI app, JSON errors, the request-context
middleware (request id, API key, body size), and reading and checking request bodies.

Every error is answered as JSON ``{"error", "detail", "id"}`` with its status, and counted as a refusal.
"""

from __future__ import annotations

import copy
import hmac
import json
import re
import uuid
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from serving import _ray_compat, oip, replica_state
from serving.schemas import ErrorResponse
from serving.settings import AuthSettings, LimitSettings

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
OPEN_PATHS = ("/v2/health/", "/docs", "/openapi.json", "/redoc")
Schema = TypeVar("Schema", bound=BaseModel)
MAX_JSON_DEPTH = 64  # far deeper than any valid request; Python's json recurses and fails near 1,000


class ApiError(Exception):
    """An error answered as JSON with a status code; raised anywhere in request handling."""

    def __init__(self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


class ReplicaFront(Protocol):
    """What the middleware needs of this replica's gateway: its limits, its API key check and its refusals."""

    limits: LimitSettings

    def authorized(self, headers: Headers) -> bool: ...
    def refused(self, status: int) -> None: ...
    def served_labels(self) -> list[str] | None: ...


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


def request_id(headers: Headers) -> str:
    """Serve's own request id: it honours a client's X-Request-ID, and Serve returns it as a header
    and writes it on every replica log line, so body, header and logs agree."""
    serve_id = _ray_compat.serve_request_id()
    if serve_id:
        return serve_id
    supplied = headers.get("x-request-id", "")
    return supplied if REQUEST_ID.match(supplied) else uuid.uuid4().hex


def error_response(request_id_: str, status: int, error: str, detail: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, "id": request_id_}, status_code=status, headers=headers)


def _error(request: Request, status: int, error: str, detail: Any = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    front: ReplicaFront | None = replica_state.gateway
    if front is not None:
        front.refused(status)
    rid = request.scope.get("state", {}).get("request_id") or request_id(request.headers)
    return error_response(rid, status, error, detail, headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(request, exc.status, exc.error, exc.detail, exc.headers)


@api.exception_handler(oip.ProtocolError)
async def _protocol_error(request: Request, exc: oip.ProtocolError) -> JSONResponse:
    return _error(request, exc.status, exc.error, exc.detail)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(request, 422, "invalid request", json.loads(json.dumps(exc.errors(), default=str)))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
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
        rid = request_id(headers)
        scope.setdefault("state", {})["request_id"] = rid
        refusal = self._refusal(replica_state.gateway, scope["path"], headers, rid)
        if refusal is not None:
            await refusal(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    @staticmethod
    def _refusal(front: ReplicaFront | None, path: str, headers: Headers, rid: str) -> JSONResponse | None:
        if front is None:
            return None
        declared, limit = headers.get("content-length", ""), front.limits.max_body_bytes
        refusal = None
        if not path.startswith(OPEN_PATHS) and not front.authorized(headers):
            refusal = error_response(rid, 401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
        elif declared.isdigit() and int(declared) > limit:
            refusal = error_response(rid, 413, f"request body over {limit} bytes")
        if refusal is not None:
            front.refused(refusal.status_code)
        return refusal


api.add_middleware(RequestContextMiddleware)


def openapi_document(labels: list[str] | None) -> dict[str, Any]:
    """The app's OpenAPI document, with the served bundle's label names as the only values a feedback label may
    take: a schema-driven client (or fuzzer) then sends only labels the server accepts."""
    document = copy.deepcopy(FastAPI.openapi(api))  # FastAPI builds it once and caches it
    if labels:
        body = document["paths"]["/v1/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        body["properties"]["labels"]["items"]["enum"] = list(labels)
    return document


def _served_openapi() -> dict[str, Any]:
    front: ReplicaFront | None = replica_state.gateway
    return openapi_document(None if front is None else front.served_labels())


api.openapi = _served_openapi  # type: ignore[method-assign]


def authorized(auth: AuthSettings, headers: Headers) -> bool:
    """A bearer token equal to the API key (compared in constant time), or no key configured."""
    if auth.api_key is None:
        return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    expected = auth.api_key.get_secret_value().encode()
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)


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


async def read_body(request: Request, limits: LimitSettings) -> bytes:
    body = await request.body()
    if len(body) > limits.max_body_bytes:
        raise ApiError(413, f"request body over {limits.max_body_bytes} bytes")
    if not body:
        raise ApiError(422, "empty request body: expected a JSON object")
    return body


def parse_json(body: bytes) -> Any:
    """The one JSON parser of request bodies (the v2 binary extension parses only its JSON header).
    Nesting is bounded first, so a deeply nested body is a 400, never a RecursionError (500)."""
    if json_depth_exceeds(body):
        raise ApiError(400, f"body nests JSON deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from exc


def validated(schema: type[Schema], payload: Any) -> Schema:
    """The payload as ``schema``, or a 422 listing what is wrong (no input echoed back)."""
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        raise ApiError(422, "invalid request", json.loads(exc.json(include_url=False, include_input=False))) from exc


def check_texts(texts: list[str], limits: LimitSettings) -> None:
    """The per-request limits: count, non-empty, length."""
    if len(texts) > limits.max_texts:
        raise ApiError(422, f"too many texts: {len(texts)} > {limits.max_texts} per request")
    for index, text in enumerate(texts):
        if not text.strip():
            raise ApiError(422, f"texts[{index}] is empty")
        if len(text) > limits.max_chars:
            raise ApiError(422, f"texts[{index}] has {len(text)} characters, over {limits.max_chars}")


def check_labelled(texts: list[str], labels: list[str], limits: LimitSettings) -> None:
    """Feedback: the texts' limits, and one label per text (names are checked against the served bundle)."""
    check_texts(texts, limits)
    if len(labels) != len(texts):
        raise ApiError(422, f"{len(texts)} texts but {len(labels)} labels: give one label per text")
