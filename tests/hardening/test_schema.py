"""schemathesis against the gateway's own OpenAPI schema, on the live main gateway: generated
requests (valid and not) never get a 500, and every answer matches what the schema declares
(status code, content type, headers, body). Generated ids name nothing stored, so the operations
on a stored response or file are also checked on real ones."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

import media
from gateways import ENV_KEYS

AUTH = {"Authorization": f"Bearer {ENV_KEYS[0]}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
EXAMPLES = 40  # per operation


def cases() -> list[tuple[str, str, GenerationMode]]:
    """(method, path, mode) of every operation, from the app's schema as built (no server
    needed): valid requests for all, invalid ones too where there is a body to get wrong."""
    from server.entrypoints.app import create_app
    from server.config import Settings

    paths = create_app(Settings()).openapi()["paths"]
    return [(method.upper(), path, mode) for path, methods in paths.items() for method, spec in methods.items()
            for mode in [GenerationMode.POSITIVE, *([GenerationMode.NEGATIVE] if "requestBody" in spec else [])]]


@pytest.fixture(scope="module")
def live_schema(hardened):
    """The schema as the running gateway serves it."""
    return schemathesis.openapi.from_url(f"{hardened.url}/openapi.json", headers=AUTH)


# schemathesis' own pytest integration (from_fixture) does not run on pytest 9, hence given()
@pytest.mark.parametrize("method, path, mode", cases())
def test_the_gateway_keeps_to_its_schema(live_schema, hardened, method, path, mode):
    operation = live_schema[path][method]

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(base_url=hardened.url, headers=AUTH, checks=CHECKS, timeout=60)

    check()


def test_the_files_and_responses_apis_are_fuzzed():
    fuzzed = {(method, path) for method, path, _ in cases()}
    assert {("POST", "/v1/responses"), ("GET", "/v1/responses/{response_id}"),
            ("DELETE", "/v1/responses/{response_id}"), ("POST", "/v1/files"), ("GET", "/v1/files"),
            ("GET", "/v1/files/{file_id}"), ("GET", "/v1/files/{file_id}/content"),
            ("DELETE", "/v1/files/{file_id}")} <= fuzzed


# what each kind of stored thing is made by, and the operations on one, the delete last
STORED = {
    "response_id": (("/v1/responses", {"json": {"input": "Hello", "max_output_tokens": 2}}),
                    ["GET /v1/responses/{response_id}", "DELETE /v1/responses/{response_id}"]),
    "file_id": (("/v1/files", {"files": {"file": ("a.png", media.image("png", seed=75))},
                               "data": {"purpose": "vision"}}),
                ["GET /v1/files/{file_id}", "GET /v1/files/{file_id}/content", "DELETE /v1/files/{file_id}"]),
}


@pytest.mark.parametrize("name", STORED)
def test_operations_on_a_stored_thing_keep_to_the_schema(live_schema, hardened, name):
    (path, request), operations = STORED[name]
    made = httpx.post(hardened.url + path, headers=AUTH, timeout=60, **request)
    assert made.status_code == 200, made.text
    for operation in operations:
        method, path = operation.split()
        case = live_schema[path][method].Case(path_parameters={name: made.json()["id"]})
        response = case.call_and_validate(base_url=hardened.url, headers=AUTH, checks=CHECKS, timeout=60)
        assert response.status_code == 200, f"{operation}: {response.text}"
