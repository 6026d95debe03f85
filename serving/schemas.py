"""HTTP API schemas: the v1 classify API and the Open Inference Protocol (KServe v2) subset we serve."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from routing.policy import Route
from serving.settings import LimitSettings

# The documented limits are LimitSettings' defaults, stated in the JSON Schema only (the replica enforces its
# configured limits), so a request valid by the OpenAPI document is accepted at the defaults.
_LIMITS = LimitSettings()
Text = Annotated[str, WithJsonSchema({
    "type": "string", "minLength": 1, "maxLength": _LIMITS.max_chars, "pattern": r"\S",
    "description": f"Not blank; at most `limits.max_chars` characters (default {_LIMITS.max_chars})."})]
TEXTS_SCHEMA = {"maxItems": _LIMITS.max_texts}
ROUTE_SCHEMA = WithJsonSchema({"type": "string", "enum": [route.value for route in Route], "default": Route.AUTO.value,
                               "description": "auto: student, teacher when unsure; or force one model."})


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads its own body (to bound its size and nesting before parsing): the
    body's schema in the OpenAPI document, so clients and fuzzers know what is accepted."""
    schema = model.model_json_schema()
    assert "$defs" not in schema, f"{model.__name__}: inline schemas only (no components to refer to)"
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(min_length=1, json_schema_extra=TEXTS_SCHEMA,
                              description="Texts to classify, answered in this order (at most `limits.max_texts`).")
    route: Annotated[Route, ROUTE_SCHEMA] = Route.AUTO


class FeedbackRequest(BaseModel):
    """Texts with their true labels (label names of the served bundle), e.g. from a human review queue."""

    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(min_length=1, json_schema_extra=TEXTS_SCHEMA)
    labels: list[str] = Field(min_length=1, json_schema_extra=TEXTS_SCHEMA,
                              description="One label name per text, in the same order.")


class FeedbackResponse(BaseModel):
    id: str
    queued: int


class Result(BaseModel):
    label: str
    probabilities: dict[str, float]
    confidence: float
    served_by: Literal["student", "teacher"]
    degraded: bool = False
    reason: str | None = None
    student_version: str
    teacher_version: str


class ClassifyResponse(BaseModel):
    id: str
    results: list[Result]


class ErrorResponse(BaseModel):
    error: str
    detail: Any = None
    id: str | None = None


class InferTensor(BaseModel):
    """An input or output tensor. ``data`` is absent when its bytes follow the JSON header (binary tensor data
    extension); ``parameters.binary_data_size`` then says how many. Unknown parameters are accepted and ignored."""

    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferRequestedOutput(BaseModel):
    """An output to return; ``parameters.binary_data`` asks for it as raw bytes."""

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    outputs: list[InferRequestedOutput] | None = Field(None, description="Only these, in this order; all if absent.")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_output: all outputs as raw bytes.")


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str
    outputs: list[InferTensor]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
