"""Schemathesis against the gateway's own /openapi.json: no server error; every answer's status code, content
type, headers and body as the document states them; and on /v1/classify, whose document states the limits the
endpoint enforces, every schema-valid request accepted.

Bounded: ``CASCADE_FUZZ_EXAMPLES`` examples per operation (default 25; a minute or two here).
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.integration

FUZZ_EXAMPLES = int(os.environ.get("CASCADE_FUZZ_EXAMPLES", "25"))
CONTRACT = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
            response_schema_conformance]
# Schema-valid must mean accepted where the document can say everything the endpoint checks. /v1/feedback's
# labels are the served bundle's label names and the v2 infer bodies are tensors whose shape must match their
# data: neither fits in a static JSON Schema, so there a refusal only has to be documented (the checks above).
ACCEPTS_ALL_VALID = {("POST", "/v1/classify")}


@pytest.fixture(scope="session")
def api_schema(gateway):
    return schemathesis.openapi.from_url(f"{gateway.url}/openapi.json", timeout=30)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case, gateway) -> None:
    operation = (case.operation.method.upper(), case.operation.path)
    checks = [*CONTRACT, positive_data_acceptance] if operation in ACCEPTS_ALL_VALID else CONTRACT
    case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, checks=checks, timeout=30)
