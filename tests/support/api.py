"""A service's HTTP API as its tests call it in-process: an account registered and logged in
through auth_svc, and the problem+json every refusal answers with."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi.testclient import TestClient

from auth_svc.application import AuthService

EMAIL = "ada@example.com"
PASSWORD = "correct horse battery"
PROBLEM_JSON = "application/problem+json"


def bearer(access_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token}"}


def register(client: httpx.Client, email: str = EMAIL, password: str = PASSWORD) -> dict[str, Any]:
    response = client.post("/auth/register", json={"email": email, "password": password})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def login(client: httpx.Client, email: str = EMAIL, password: str = PASSWORD) -> dict[str, Any]:
    response = client.post("/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """`response` is a problem+json document of `status`, with the fields every one has."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail", "request_id"} <= body.keys()
    return body


def service(client: TestClient) -> AuthService:
    """The AuthService behind a TestClient of auth_svc's app."""
    auth: AuthService = client.app.state.auth_service  # type: ignore[attr-defined]
    return auth


def stored_position(client: TestClient) -> int:
    """The newest position in that auth_svc's event store (0 when empty)."""
    return service(client).recorder.max_notification_id() or 0
