"""auth_svc's own Bearer routes refuse the access token of an ended session at once (issue 16):
auth_svc knows its sessions, so it checks the token's `sid` against the account's live
sessions instead of waiting for `auth.session.revoked`. Real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient

from auth_svc.main import create_app
from servicekit.sealing import new_key_pair
from testbed.auth import auth_database
from tests.support.api import EMAIL, PASSWORD, assert_problem, bearer, login, register

_, PUBLIC_KEY = new_key_pair()


@pytest.fixture
def client(make_database: Callable[[str], str]) -> Iterator[TestClient]:
    settings = auth_database(make_database("auth"), link_sealing_public_key=PUBLIC_KEY)
    with TestClient(create_app(settings)) as c:
        yield c


def sid(pair: dict[str, Any]) -> str:
    return str(jwt.decode(pair["access_token"], options={"verify_signature": False})["sid"])


def bearer_routes(client: TestClient, access_token: str) -> dict[str, int]:
    """The status each of auth_svc's Bearer routes answers the token with."""
    headers = bearer(access_token)
    return {
        "GET /auth/sessions": client.get("/auth/sessions", headers=headers).status_code,
        "POST /auth/email/verify/resend": client.post(
            "/auth/email/verify/resend", headers=headers
        ).status_code,
        "POST /auth/password": client.post(
            "/auth/password",
            headers=headers,
            json={"current_password": "wrong but long", "new_password": "never applied pw"},
        ).status_code,
        "DELETE /auth/sessions/{id}": client.delete(
            f"/auth/sessions/{uuid.uuid4()}", headers=headers
        ).status_code,
        "POST /auth/logout-all": client.post("/auth/logout-all", headers=headers).status_code,
    }


def test_an_ended_sessions_token_is_refused_by_every_bearer_route_of_auth_svc(
    client: TestClient,
) -> None:
    register(client)
    phone, laptop = login(client), login(client)
    assert client.get("/auth/sessions", headers=bearer(phone["access_token"])).status_code == 200

    ended = client.delete(f"/auth/sessions/{sid(phone)}", headers=bearer(laptop["access_token"]))
    assert ended.status_code == 204
    refused = client.get("/auth/sessions", headers=bearer(phone["access_token"]))
    body = assert_problem(refused, 401)
    assert "ended" in body["detail"]
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert set(bearer_routes(client, phone["access_token"]).values()) == {401}

    # The other session is untouched (logout-all last: it ends this one too).
    still = client.get("/auth/sessions", headers=bearer(laptop["access_token"]))
    assert still.status_code == 200
    assert [s["id"] for s in still.json()["sessions"]] == [sid(laptop)]
    assert client.post("/auth/logout-all", headers=bearer(laptop["access_token"])).status_code == (
        204
    )
    assert set(bearer_routes(client, laptop["access_token"]).values()) == {401}


def test_a_refreshed_session_keeps_working_and_a_password_change_ends_it(
    client: TestClient,
) -> None:
    register(client)
    first = login(client)
    refreshed = client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert refreshed.status_code == 200
    # Same session (sid): both access tokens are alive until it ends.
    for token in (first["access_token"], refreshed.json()["access_token"]):
        assert client.get("/auth/sessions", headers=bearer(token)).status_code == 200

    changed = client.post(
        "/auth/password",
        headers=bearer(first["access_token"]),
        json={"current_password": PASSWORD, "new_password": "another good one"},
    )
    assert changed.status_code == 204
    assert_problem(client.get("/auth/sessions", headers=bearer(first["access_token"])), 401)
    fresh = login(client, EMAIL, "another good one")
    assert client.get("/auth/sessions", headers=bearer(fresh["access_token"])).status_code == 200


def test_a_reused_refresh_token_ends_the_session_for_its_access_tokens_too(
    client: TestClient,
) -> None:
    register(client)
    pair = login(client)
    assert client.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]}).is_success
    reused = client.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert_problem(reused, 401)  # a spent token: its whole family is revoked
    assert_problem(client.get("/auth/sessions", headers=bearer(pair["access_token"])), 401)
