"""The OpenAPI document says what the server accepts: a body the document calls valid passes the gateway's own
checks, and one it calls invalid is refused, so a schema-driven fuzzer (tests/integration/test_fuzz.py) has nothing
to disagree with. The FastAPI app alone, no Ray: each body is judged by the document (with jsonschema_rs, the
validator schemathesis uses, and Python's jsonschema) and by the functions the routes call.

Not stated by the document, as no static JSON Schema can: feedback label names (the served bundle's), and v2
shapes other than [n] and [n, 1] (accepted when their product is the number of texts).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from serving import oip
from serving.gateway import api
from serving.http import ApiError, check_labelled, check_texts
from serving.schemas import NOT_BLANK, ClassifyRequest, FeedbackRequest
from serving.settings import GatewayConfig, LimitSettings

LIMITS = LimitSettings()
DOC = api.openapi()
BODY_ROUTES = ["/v1/classify", "/v1/feedback", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"]


def body_schema(path: str) -> dict[str, Any]:
    return DOC["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def documented(path: str) -> Callable[[Any], bool]:
    """Whether the document calls a body valid; both validators must agree."""
    schema = body_schema(path)
    python = jsonschema.Draft202012Validator(schema)
    rust = pytest.importorskip("jsonschema_rs").validator_for(schema)

    def valid(body: Any) -> bool:
        verdict = python.is_valid(body)
        assert rust.is_valid(body) == verdict, f"the validators disagree on {body!r}"
        return verdict

    return valid


def accepted(check: Callable[[Any], None]) -> Callable[[Any], bool]:
    def judge(body: Any) -> bool:
        try:
            check(body)
        except (ApiError, oip.ProtocolError, ValueError):  # pydantic's ValidationError is a ValueError
            return False
        return True

    return judge


LIMITS = GatewayConfig().limits  # the gateway's checks read its configured limits
SERVER: dict[str, Callable[[Any], bool]] = {
    "/v1/classify": accepted(lambda body: check_texts(ClassifyRequest.model_validate(body).texts, LIMITS)),
    "/v1/feedback": accepted(lambda body: check_labelled(*_labelled(FeedbackRequest.model_validate(body)), LIMITS)),
    "/v2/models/{name}/infer": accepted(lambda body: check_texts(oip.parse_request(body, b"").texts, LIMITS)),
}


def _labelled(request: FeedbackRequest) -> tuple[list[str], list[str]]:
    return request.texts, request.labels


def test_every_route_that_reads_a_body_declares_it_required() -> None:
    for path in BODY_ROUTES:
        body = DOC["paths"][path]["post"]["requestBody"]
        assert body["required"] is True, path
        assert body["content"]["application/json"]["schema"]["type"] == "object", path


def test_blank_in_the_document_is_exactly_what_str_strip_empties() -> None:
    """The gateway refuses a text that ``str.strip()`` empties. JSON Schema's ``\\S`` disagreed on six characters
    (four control characters, NEL and the BOM); the spelled-out class agrees on every code point, under Python's
    regex engine and the Rust one schemathesis validates with."""
    texts = body_schema("/v1/classify")["properties"]["texts"]["items"]
    assert texts["pattern"] == NOT_BLANK and texts["minLength"] == 1 and texts["maxLength"] == LIMITS.max_chars
    pattern = re.compile(NOT_BLANK)
    wrong = [hex(c) for c in range(sys.maxunicode + 1) if (pattern.search(chr(c)) is None) != chr(c).isspace()]
    assert not wrong
    rust = pytest.importorskip("jsonschema_rs").validator_for({"type": "string", "pattern": NOT_BLANK})
    surrogates = range(0xD800, 0xE000)
    wrong = [hex(c) for c in range(0x10000) if c not in surrogates and rust.is_valid(chr(c)) == chr(c).isspace()]
    assert not wrong
    assert body_schema("/v1/feedback")["properties"]["texts"]["items"]["pattern"] == NOT_BLANK
    data = body_schema("/v2/models/{name}/infer")["properties"]["inputs"]["items"]["properties"]["data"]
    assert data["items"]["anyOf"][0]["pattern"] == NOT_BLANK


def test_feedback_declares_one_label_per_text() -> None:
    pairs = body_schema("/v1/feedback")["anyOf"]
    assert len(pairs) == LIMITS.max_texts
    valid = documented("/v1/feedback")
    for texts in (1, 2, LIMITS.max_texts):
        for labels in (texts - 1, texts, texts + 1):
            body = {"texts": ["a"] * texts, "labels": ["pos"] * labels}
            assert valid(body) == (labels == texts and labels <= LIMITS.max_texts), body


def test_infer_declares_one_bytes_input_whose_shape_counts_its_texts() -> None:
    inputs = body_schema("/v2/models/{name}/infer")["properties"]["inputs"]
    assert inputs["minItems"] == inputs["maxItems"] == 1
    tensor = inputs["items"]
    assert tensor["properties"]["datatype"]["enum"] == ["BYTES"]
    assert {"name", "shape", "datatype", "data"} <= set(tensor["required"])
    assert len(tensor["anyOf"]) == LIMITS.max_texts  # shape [n] or [n, 1] with n texts, for each n


def text_input(shape: list[int], data: list[Any], **fields: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": shape, "datatype": "BYTES", "data": data, **fields}]}


MAX, CHARS = LIMITS.max_texts, LIMITS.max_chars
CASES: dict[str, list[Any]] = {
    "/v1/classify": [
        {"texts": ["a fine film"]}, {"texts": ["a"], "route": "teacher"}, {"texts": ["a"], "route": "bogus"},
        {"texts": ["\x1f"]}, {"texts": ["\x1c\x1d \x85\t"]}, {"texts": ["\u3000\u2028\xa0"]}, {"texts": ["\ufeff"]},
        {"texts": ["\x00"]}, {"texts": [" \x1fx "]}, {"texts": [""]}, {"texts": ["a" * CHARS]},
        {"texts": ["a" * (CHARS + 1)]}, {"texts": []}, {"texts": ["a"] * MAX}, {"texts": ["a"] * (MAX + 1)},
        {"texts": ["a"], "extra": 1}, {}, [], {"texts": "a"}, {"texts": [1]},
    ],
    "/v1/feedback": [
        {"texts": ["a"], "labels": ["pos"]}, {"texts": ["a", "b"], "labels": ["pos"]},
        {"texts": ["a"], "labels": ["pos", "neg"]}, {"texts": ["a"] * MAX, "labels": ["pos"] * MAX},
        {"texts": ["a"] * (MAX + 1), "labels": ["pos"] * (MAX + 1)}, {"texts": [], "labels": []},
        {"texts": ["\x1e"], "labels": ["pos"]}, {"texts": ["a"]}, {"texts": ["a"], "labels": ["pos"], "x": 1},
    ],
    "/v2/models/{name}/infer": [
        text_input([2], ["a", "b"]), text_input([2, 1], [["a"], ["b"]]), text_input([2, 1], ["a", "b"]),
        text_input([2], [["a"], ["b"]]), text_input([3], ["a", "b"]), text_input([1], ["a", "b"]),
        text_input([0], []), text_input([1], ["\x1f"]), text_input([1], [""]), text_input([1], [1]),
        text_input([MAX], ["a"] * MAX), text_input([MAX + 1], ["a"] * (MAX + 1)), text_input([-1], ["a"]),
        text_input([1], ["a"], parameters={"binary_data_size": 3}),
        text_input([1], ["a"], parameters={"binary_data_size": None}),
        {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": ["a"]}]},
        {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]},
        {"inputs": [text_input([1], ["a"])["inputs"][0]] * 2}, {"inputs": []}, {},
        {**text_input([1], ["a"]), "outputs": [{"name": "label"}]},
        {**text_input([1], ["a"]), "outputs": []},
        {**text_input([1], ["a"]), "outputs": [{"name": "label"}, {"name": "probabilities"}]},
        {**text_input([1], ["a"]), "outputs": [{"name": "label"}, {"name": "label", "parameters": {}}]},
        {**text_input([1], ["a"]), "outputs": [{"name": "logits"}]},
        {**text_input([1], ["a"]), "outputs": [{"name": "label", "parameters": {"binary_data": True}}]},
        {**text_input([1], ["a"]), "outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]},
        {**text_input([1], ["a"]), "parameters": {"binary_data_output": True}},
        {**text_input([1], ["a"]), "parameters": {"binary_data_output": 1}},
        {**text_input([1], ["a"]), "id": "req-1"}, {**text_input([1], ["a"]), "id": 5},
        {**text_input([1], ["a"]), "something_else": 1},
    ],
}


@pytest.mark.parametrize("path", list(CASES))
def test_the_document_and_the_gateway_agree_on_each_body(path: str) -> None:
    valid, server = documented(path), SERVER[path]
    verdicts = [(body, valid(body), server(body)) for body in CASES[path]]
    disagreements = [(repr(body)[:120], doc, srv) for body, doc, srv in verdicts if doc != srv]
    assert not disagreements, "(body, document says valid, gateway accepts): " + repr(disagreements)
    assert any(doc for _, doc, _ in verdicts) and not all(doc for _, doc, _ in verdicts)  # both kinds were tried


def test_infer_documents_its_binary_answer() -> None:
    ok = DOC["paths"]["/v2/models/{name}/infer"]["post"]["responses"]["200"]
    assert set(ok["content"]) == {"application/json", oip.BINARY_CONTENT_TYPE}
    assert oip.HEADER_LENGTH in ok["headers"]


def test_the_openapi_document_states_the_answers_and_limits_of_classify() -> None:
    from serving.gateway import api

    doc = api.openapi()
    classify = doc["paths"]["/v1/classify"]["post"]
    assert {"400", "401", "405", "413", "422", "503"} <= set(classify["responses"])
    assert "Allow" in classify["responses"]["405"]["headers"]
    assert "Retry-After" in classify["responses"]["503"]["headers"]
    assert "404" in doc["paths"]["/v2/models/{name}/infer"]["post"]["responses"]
    texts = classify["requestBody"]["content"]["application/json"]["schema"]["properties"]["texts"]
    limits = LimitSettings()
    assert texts["minItems"] == 1 and texts["maxItems"] == limits.max_texts
    assert texts["items"]["maxLength"] == limits.max_chars


def test_a_wrong_method_is_a_json_405_with_allow() -> None:
    from starlette.testclient import TestClient

    from serving.gateway import api

    answer = TestClient(api).get("/v1/classify")
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"
    assert answer.json()["error"] == "Method Not Allowed"




def test_the_served_labels_are_the_only_feedback_labels_the_document_allows() -> None:
    import jsonschema as validator

    from serving.http import openapi_document

    def body_schema(document: dict) -> dict:
        return document["paths"]["/v1/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]

    served = body_schema(openapi_document(["neg", "pos"]))
    validator.validate({"texts": ["a"], "labels": ["pos"]}, served)
    with pytest.raises(validator.ValidationError):
        validator.validate({"texts": ["a"], "labels": ["unknown"]}, served)
    assert "enum" not in body_schema(openapi_document(None))["properties"]["labels"]["items"]
