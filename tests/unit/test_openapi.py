"""The OpenAPI documents of the REST services say what the services send: problems as
application/problem+json with their schema, explicit operationIds, the response headers,
servers and info. (tests/integration/test_openapi_clients.py drives a generated client.)"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.utils import generate_unique_id

from auth_svc.main import create_app as auth_app
from auth_svc.settings import AuthSettings
from servicekit.openapi import GATEWAY_URL
from servicekit.problems import PROBLEM_JSON
from user_svc.main import create_app as user_app
from user_svc.settings import UserSettings

APPS = {"auth_svc": auth_app, "user_svc": user_app}
# Renaming or removing one breaks every generated client's function names: keep them (a new
# route adds its own).
OPERATION_IDS = {
    "auth_svc": {
        "register",
        "login",
        "loginWithPasswordForm",
        "refreshTokens",
        "logout",
        "changePassword",
        "getJwks",
    },
    "user_svc": {"getMyProfile", "updateMyProfile", "getPublicProfile"},
}
PORTS = {"auth_svc": AuthSettings().port, "user_svc": UserSettings().port}


@pytest.fixture(scope="module", params=sorted(APPS))
def service(request: pytest.FixtureRequest) -> tuple[str, FastAPI, dict[str, Any]]:
    name: str = request.param
    app = APPS[name]()
    return name, app, app.openapi()


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]


def test_every_problem_response_is_problem_json_with_its_schema(
    service: tuple[str, FastAPI, dict[str, Any]],
) -> None:
    _, _, document = service
    schemas = document["components"]["schemas"]
    assert {"ProblemDetail", "ValidationProblem", "FieldError"} <= schemas.keys()
    assert "HTTPValidationError" not in schemas
    checked = 0
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            if int(status) < 400 or status == "429":  # 429 is the gateway's own body
                continue
            expected = "ValidationProblem" if status == "422" else "ProblemDetail"
            assert response["content"] == {
                PROBLEM_JSON: {"schema": {"$ref": f"#/components/schemas/{expected}"}}
            }, f"{method} {path} {status}"
            checked += 1
    assert checked >= len(document["paths"])


def test_a_request_with_a_body_documents_its_422(
    service: tuple[str, FastAPI, dict[str, Any]],
) -> None:
    _, _, document = service
    for method, path, operation in operations(document):
        if "requestBody" in operation:
            assert "422" in operation["responses"], f"{method} {path}"


def test_operation_ids_are_explicit_and_stable(
    service: tuple[str, FastAPI, dict[str, Any]],
) -> None:
    name, app, document = service
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids))
    assert OPERATION_IDS[name] <= set(ids)
    for route in app.routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            assert route.operation_id, f"{route.path} has FastAPI's {generate_unique_id(route)}"


def test_every_response_documents_its_headers(
    service: tuple[str, FastAPI, dict[str, Any]],
) -> None:
    _, _, document = service
    assert {"X-Request-ID", "RateLimit-Limit", "Retry-After"} <= document["components"][
        "headers"
    ].keys()
    for method, path, operation in operations(document):
        assert "429" in operation["responses"], f"{method} {path}: the gateway's rate limit"
        for status, response in operation["responses"].items():
            headers = response["headers"]
            names = {"X-Request-ID", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"}
            assert names <= headers.keys(), f"{method} {path} {status}"
            if status in ("423", "429"):
                assert "Retry-After" in headers, f"{method} {path} {status}"


def test_the_profile_documents_its_etag() -> None:
    paths = user_app().openapi()["paths"]
    for method, status in (("get", "200"), ("patch", "200"), ("patch", "412")):
        assert "ETag" in paths["/users/me"][method]["responses"][status]["headers"]


def test_servers_and_info_are_filled_in(service: tuple[str, FastAPI, dict[str, Any]]) -> None:
    name, _, document = service
    assert document["info"]["title"] == name
    assert document["info"]["version"]
    assert "application/problem+json" in document["info"]["description"]
    urls = [s["url"] for s in document["servers"]]
    assert urls == [GATEWAY_URL, f"http://127.0.0.1:{PORTS[name]}"]
    for _, _, operation in operations(document):
        assert operation["summary"]
