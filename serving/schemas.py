"""HTTP API schemas: the v1 classify API and the Open Inference Protocol (KServe v2) subset we serve."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from routing.policy import Route
from serving.settings import LimitSettings

# The documented limits are LimitSettings' defaults, stated in the JSON Schema only (the replica enforces its
# configured limits), so a request valid by the OpenAPI document is accepted at the defaults.
_LIMITS = LimitSettings()
# Output name -> datatype, in the order the model metadata lists them and a request without `outputs` gets them.
OUTPUTS = {"label": "BYTES", "probabilities": "FP32", "served_by": "BYTES", "degraded": "BOOL"}
# A text is blank when str.strip() leaves nothing, i.e. when every character is one str.isspace() accepts; these are
# those characters, spelled out. JSON Schema's `\S` (ECMA-262) is not Python's: it takes \x1c-\x1f and \x85 (control
# characters Python strips) as text and \ufeff (which Python keeps) as space, so the document let through texts
# the gateway refuses and refused one it accepts.
NOT_BLANK = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
TEXT_SCHEMA: dict[str, Any] = {
    "type": "string", "minLength": 1, "maxLength": _LIMITS.max_chars, "pattern": NOT_BLANK,
    "description": f"Not blank (at least one character that is not whitespace; the control characters \\x1c-\\x1f "
                   f"and \\x85 count as whitespace); at most `limits.max_chars` characters (default "
                   f"{_LIMITS.max_chars})."}
Text = Annotated[str, WithJsonSchema(TEXT_SCHEMA)]
TEXTS_SCHEMA = {"maxItems": _LIMITS.max_texts}
ROUTE_SCHEMA = WithJsonSchema({"type": "string", "enum": [route.value for route in Route], "default": Route.AUTO.value,
                               "description": "auto: student, teacher when unsure; or force one model."})


def same_length(shapes: Callable[[int], dict[str, Any]], most: int = _LIMITS.max_texts) -> dict[str, Any]:
    """One ``anyOf`` branch per count of texts, 1 to ``most``, from ``shapes(n)`` (property -> its schema at n).
    JSON Schema cannot compare two arrays' lengths, but it can list the lengths allowed, and the limit on texts
    keeps the list short; without it a fuzzer's schema-valid body pairs 2 texts with 1 label."""
    return {"anyOf": [{"properties": shapes(n)} for n in range(1, most + 1)]}


def exactly(n: int) -> dict[str, int]:
    return {"minItems": n, "maxItems": n}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads its own body (to bound its size and nesting before parsing): the
    body's schema in the OpenAPI document, required, so clients and fuzzers know what is accepted."""
    schema = model.model_json_schema()
    assert "$defs" not in schema, f"{model.__name__}: inline schemas only (no components to refer to)"
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(min_length=1, json_schema_extra=TEXTS_SCHEMA,
                              description="Texts to classify, answered in this order (at most `limits.max_texts`).")
    route: Annotated[Route, ROUTE_SCHEMA] = Route.AUTO


class FeedbackRequest(BaseModel):
    """Texts with their true labels (label names of the served bundle), e.g. from a human review queue. As many
    labels as texts: the ``anyOf`` lists the lengths allowed, one branch each."""

    model_config = ConfigDict(extra="forbid",
                              json_schema_extra=same_length(lambda n: {"texts": exactly(n), "labels": exactly(n)}))

    texts: list[Text] = Field(min_length=1, json_schema_extra=TEXTS_SCHEMA)
    labels: list[str] = Field(min_length=1, json_schema_extra=TEXTS_SCHEMA,
                              description="One label name per text, in the same order (as many labels as texts): "
                              "names of the served bundle, the keys of a classify answer's `probabilities`.")


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


def _object_or_null(properties: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [{"type": "object", "properties": properties}, {"type": "null"}]}


# What /v2/models/{name}/infer accepts as a JSON body, documented field by field (the gateway checks it in
# serving/oip.py, with its own 400 and 422 messages): one BYTES input whose `data` holds the texts, flat or one
# per row, and whose `shape` counts them. Any shape whose product is the number of texts is accepted; the document
# lists the two that clients send, [n] and [n, 1], paired with n texts as feedback's labels are with its texts.
# The binary tensor data extension is left out: it needs the Inference-Header-Content-Length header.
_TENSOR_TEXT = {"anyOf": [TEXT_SCHEMA, {"type": "array", "minItems": 1, "maxItems": 1, "items": TEXT_SCHEMA}]}
INFER_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "shape", "datatype", "data"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0},
                  "description": "[n] or [n, 1] for n texts (any shape whose product is n is accepted)."},
        "datatype": {"type": "string", "enum": ["BYTES"]},
        "data": {"type": "array", "minItems": 1, "maxItems": _LIMITS.max_texts, "items": _TENSOR_TEXT,
                 "description": "The texts, flat or one per row (at most `limits.max_texts`)."},
        "parameters": _object_or_null({"binary_data_size": {
            "type": "null", "description": "Binary tensor data only (with the Inference-Header-Content-Length "
                                           "header); a JSON body carries its texts in `data`."}}),
    },
    **same_length(lambda n: {"shape": {"enum": [[n], [n, 1]]}, "data": exactly(n)}),
}
# Each output at most once (a name asked twice is a 400): `maxContains` per name.
INFER_OUTPUTS_SCHEMA: dict[str, Any] = {"anyOf": [{
    "type": "array",
    "items": {"type": "object", "required": ["name"],
              "properties": {"name": {"type": "string", "enum": list(OUTPUTS)},
                             "parameters": _object_or_null({"binary_data": {"type": "boolean"}})}},
    "allOf": [{"contains": {"properties": {"name": {"const": name}}}, "minContains": 0, "maxContains": 1}
              for name in OUTPUTS],
}, {"type": "null"}]}


class InferRequest(BaseModel):
    id: str | None = None
    inputs: Annotated[list[InferTensor], WithJsonSchema({
        "type": "array", "minItems": 1, "maxItems": 1, "items": INFER_INPUT_SCHEMA,
        "description": "Exactly one input: the texts, datatype BYTES."})] = Field(min_length=1)
    outputs: Annotated[list[InferRequestedOutput] | None, WithJsonSchema(INFER_OUTPUTS_SCHEMA)] = Field(
        None, description="Only these, in this order, each at most once; all if absent.")
    parameters: Annotated[dict[str, Any] | None, WithJsonSchema(_object_or_null({
        "binary_data_output": {"type": "boolean"}}))] = Field(
        None, description="binary_data_output: all outputs as raw bytes.")


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
