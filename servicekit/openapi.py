"""The OpenAPI document of a REST service, as its clients need it.

FastAPI writes most of it from the routes. What it cannot know is completed here, once for
every service: the problem schemas (every 4xx/5xx is application/problem+json), the headers
every response carries (`X-Request-ID` from the service, `RateLimit-*` from the gateway), the
gateway's own 429, and where the API is served. A generated client (openapi-python-client,
tests/integration/test_openapi_clients.py) then types every answer, problems included.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

from servicekit.problems import PROBLEM_JSON, header, problem_content, problem_schemas

# The local gateway (`esctl up`, Kong's proxy port); services own their path prefix, so the
# same paths are served there and by each service directly.
GATEWAY_URL = "http://127.0.0.1:8000"

SHARED_HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-ID": header(
        "The request's id: the caller's `X-Request-ID` if it sent one, else a new one. "
        "Also in every problem body (`request_id`), the logs and the events it caused."
    ),
}
# Kong's rate-limiting plugin (compose/kong.yml) adds these to every response it proxies.
GATEWAY_HEADERS: dict[str, dict[str, Any]] = {
    "RateLimit-Limit": header(
        "Requests allowed per window for this client (sent by the gateway).", "integer"
    ),
    "RateLimit-Remaining": header(
        "Requests left in the current window (sent by the gateway).", "integer"
    ),
    "RateLimit-Reset": header("Seconds until the window resets (sent by the gateway).", "integer"),
}
RETRY_AFTER = header("Seconds to wait before trying again.", "integer")

# The gateway answers a client over its rate limit itself, with Kong's body, not a problem.
GATEWAY_MESSAGE = {
    "title": "GatewayMessage",
    "type": "object",
    "description": "The gateway's own refusal (Kong's body), e.g. over the rate limit.",
    "properties": {"message": {"type": "string", "examples": ["API rate limit exceeded"]}},
    "required": ["message"],
}
TOO_MANY_REQUESTS = {
    "description": "Over the gateway's rate limit for this client; see `Retry-After`",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GatewayMessage"}}},
    "headers": {"Retry-After": {"$ref": "#/components/headers/Retry-After"}},
}
# FastAPI's default 422 (a list of pydantic errors as application/json): never what we send.
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def api_servers(port: int, *, gateway_url: str = GATEWAY_URL) -> list[dict[str, str]]:
    """The OpenAPI `servers`: the gateway first (what clients use), then the service itself."""
    return [
        {
            "url": gateway_url,
            "description": "The gateway (local default of `esctl up`); in production, the "
            "deployment's public address",
        },
        {"url": f"http://127.0.0.1:{port}", "description": "The service itself (local default)"},
    ]


def install_openapi(app: FastAPI) -> None:
    """Serve `complete_openapi` of FastAPI's document as the app's OpenAPI document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            # A copy: FastAPI's document shares dicts with the routes' `responses=`.
            app.openapi_schema = complete_openapi(copy.deepcopy(FastAPI.openapi(app)))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


API_CONVENTIONS = (
    "Every error is `application/problem+json` (RFC 9457): `type`, `title`, `status`, "
    "`detail` and the `request_id`, also echoed in the `X-Request-ID` header of every response. "
    "Through the gateway, responses also carry `RateLimit-Limit`, `RateLimit-Remaining` and "
    "`RateLimit-Reset`, and a client over the limit gets 429 with `Retry-After`."
)


def complete_openapi(document: dict[str, Any]) -> dict[str, Any]:
    """Add the problem schemas and the shared headers; replace FastAPI's default 422."""
    info = document.setdefault("info", {})
    info["description"] = "\n\n".join(filter(None, (info.get("description"), API_CONVENTIONS)))
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(problem_schemas())
    schemas["GatewayMessage"] = GATEWAY_MESSAGE
    for name in FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    components["headers"] = {
        **SHARED_HEADERS,
        **GATEWAY_HEADERS,
        "Retry-After": RETRY_AFTER,
        **components.get("headers", {}),
    }
    for path in document.get("paths", {}).values():
        for method in METHODS:
            if method in path:
                _complete_operation(path[method])
    return document


def _complete_operation(operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    responses.setdefault("429", copy.deepcopy(TOO_MANY_REQUESTS))
    for status, response in responses.items():
        content = response.get("content", {})
        ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
        if ref.rsplit("/", 1)[-1] in FASTAPI_VALIDATION_SCHEMAS:
            response["description"] = "Invalid request: a field is missing, unknown or invalid"
            response["content"] = problem_content(int(status))
        elif int(status) >= 400 and status != "429" and PROBLEM_JSON not in content:
            response["content"] = problem_content(int(status))
        headers = response.setdefault("headers", {})
        for name in (*SHARED_HEADERS, *GATEWAY_HEADERS):
            headers.setdefault(name, {"$ref": f"#/components/headers/{name}"})
