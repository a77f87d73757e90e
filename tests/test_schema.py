"""Schemathesis over /openapi.json: generated requests to every route never get a 5xx, and every response
matches what the schema declares for it (status code, content type, body)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def schema(serve, llama):
    server = serve(llama.settings(max_new_tokens=8, max_input_tokens=64, max_queue=64))
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_every_route_keeps_its_contract(schema):
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 14  # native 9, OpenAI 3, metrics, ready
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(checks=CHECKS, timeout=60)

        check()
