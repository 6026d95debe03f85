"""Schemathesis against the gateway's own /openapi.json: no server error, every answer's status code, content
type, headers and body as the document states them, and schema-valid requests accepted.

Bounded: ``FUZZ_EXAMPLES`` examples per operation (the whole run takes a minute or two here).
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.integration

FUZZ_EXAMPLES = int(os.environ.get("CASCADE_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="session")
def api_schema(gateway):
    return schemathesis.openapi.from_url(f"{gateway.url}/openapi.json", timeout=30)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case, gateway) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
