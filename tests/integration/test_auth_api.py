"""auth_svc's HTTP API against a real PostgreSQL database, one fresh database per test."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from auth_svc.contracts import to_contract
from auth_svc.main import create_app
from auth_svc.settings import AuthSettings
from servicekit.eventstore import connection_kwargs
from testbed.auth import auth_database
from tests.support.api import (
    EMAIL,
    PASSWORD,
    assert_problem,
    bearer,
    login,
    register,
    service,
    stored_position,
)

JSON_ENDPOINTS = ["/auth/register", "/auth/login", "/auth/refresh", "/auth/logout"]


def ready_settings(database_url: str, **overrides: Any) -> AuthSettings:
    """Cheap hashing, a lockout after three failures, auth_svc's tables in the database."""
    return auth_database(database_url, **{"db_pool_size": 10, "lockout_threshold": 3, **overrides})


@pytest.fixture
def settings(make_database: Callable[[str], str]) -> AuthSettings:
    return ready_settings(make_database("auth"))


@pytest.fixture
def client(settings: AuthSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def without_request_id(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "request_id"}


# --- register ---------------------------------------------------------------------------


def test_register_creates_an_account_with_a_normalised_email(client: TestClient) -> None:
    response = client.post(
        "/auth/register",
        json={"email": "  Ada@EXAMPLE.com ", "password": PASSWORD, "display_name": " Ada "},
    )
    assert response.status_code == 201
    body = response.json()
    assert body["email"] == EMAIL
    uuid.UUID(body["user_id"])
    account = service(client).get_account(uuid.UUID(body["user_id"]))
    assert account.display_name == "Ada"
    assert login(client, email="ADA@example.com ")["token_type"] == "bearer"


def test_registering_a_taken_email_in_any_spelling_is_a_conflict(client: TestClient) -> None:
    register(client)
    before = stored_position(client)
    response = client.post("/auth/register", json={"email": "ADA@example.com", "password": "x" * 8})
    assert_problem(response, 409)
    assert stored_position(client) == before


def test_twenty_concurrent_registrations_of_one_email_give_exactly_one_account(
    client: TestClient,
) -> None:
    def attempt(i: int) -> int:
        body = {"email": "race@example.com", "password": f"password-{i}"}
        return client.post("/auth/register", json=body).status_code

    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(attempt, range(20)))
    assert statuses.count(201) == 1, statuses
    assert statuses.count(409) == 19, statuses
    # One Registered and one Claimed event: nothing from the losers was stored.
    assert stored_position(client) == 2


@pytest.mark.parametrize(
    "body",
    [
        {"email": "not-an-email", "password": PASSWORD},
        {"email": EMAIL, "password": "short7c"},
        {"email": EMAIL, "password": "p" * 129},
        {"email": EMAIL},
        {"password": PASSWORD},
        {"email": EMAIL, "password": 12345678},
        {"email": ["a@b.c"], "password": PASSWORD},
        {"email": EMAIL, "password": PASSWORD, "display_name": "x" * 101},
        {"email": EMAIL, "password": PASSWORD, "display_name": "   "},
        {"email": EMAIL, "password": PASSWORD, "is_admin": True},
        [],
    ],
)
def test_invalid_registrations_are_422_and_store_nothing(client: TestClient, body: Any) -> None:
    before = stored_position(client)
    problem = assert_problem(client.post("/auth/register", json=body), 422)
    assert problem["errors"]
    assert stored_position(client) == before


def test_password_length_bounds_are_8_and_128(client: TestClient) -> None:
    assert register(client, "eight@example.com", "Ada-1815")
    assert register(client, "max@example.com", "pqrs" * 32)


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_malformed_json_is_400_problem(client: TestClient, path: str) -> None:
    before = stored_position(client)
    response = client.post(
        path, content=b'{"email": "a@b.c", ', headers={"content-type": "application/json"}
    )
    assert_problem(response, 400)
    assert stored_position(client) == before


@pytest.mark.parametrize("path", [*JSON_ENDPOINTS, "/auth/token", "/auth/password"])
def test_bodies_over_64_kib_are_413(client: TestClient, path: str) -> None:
    before = stored_position(client)
    huge = '{"email": "a@example.com", "password": "' + "x" * 70_000 + '"}'
    response = client.post(path, content=huge, headers={"content-type": "application/json"})
    assert_problem(response, 413)
    assert stored_position(client) == before


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/auth/login", {"email": EMAIL, "password": PASSWORD, "remember": True}),
        ("/auth/login", {"email": EMAIL}),
        ("/auth/login", {"email": EMAIL, "password": ""}),
        ("/auth/login", {"email": 5, "password": PASSWORD}),
        ("/auth/refresh", {}),
        ("/auth/refresh", {"refresh_token": 42}),
        ("/auth/refresh", {"refresh_token": "x", "extra": 1}),
        ("/auth/logout", {"refresh_token": None}),
        ("/auth/logout", {"refresh_token": "x", "all": True}),
    ],
)
def test_invalid_bodies_are_422_on_every_endpoint(
    client: TestClient, path: str, body: dict[str, Any]
) -> None:
    register(client)
    before = stored_position(client)
    assert_problem(client.post(path, json=body), 422)
    assert stored_position(client) == before


# --- login ------------------------------------------------------------------------------


def test_login_returns_a_bearer_token_pair(client: TestClient) -> None:
    register(client)
    response = client.post("/auth/login", json={"email": EMAIL, "password": PASSWORD})
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 900
    assert body["access_token"].count(".") == 2
    assert len(body["refresh_token"]) >= 64


def test_login_with_wrong_password_is_rejected_like_unknown_email(client: TestClient) -> None:
    register(client)
    wrong = client.post("/auth/login", json={"email": EMAIL, "password": "wrong password"})
    unknown = client.post("/auth/login", json={"email": "bob@example.com", "password": PASSWORD})
    assert without_request_id(assert_problem(wrong, 401)) == without_request_id(
        assert_problem(unknown, 401)
    )
    assert wrong.headers.get("retry-after") is None


def test_login_with_an_unknown_email_stores_nothing(client: TestClient) -> None:
    register(client)
    before = stored_position(client)
    client.post("/auth/login", json={"email": "bob@example.com", "password": PASSWORD})
    assert stored_position(client) == before


def test_repeated_failures_lock_the_account_with_retry_after(client: TestClient) -> None:
    register(client)
    for _ in range(3):
        response = client.post("/auth/login", json={"email": EMAIL, "password": "wrong password"})
        assert_problem(response, 401)
    locked = client.post("/auth/login", json={"email": EMAIL, "password": PASSWORD})
    assert_problem(locked, 423)
    assert 890 <= int(locked.headers["retry-after"]) <= 900
    token = client.post("/auth/token", data={"username": EMAIL, "password": PASSWORD})
    assert_problem(token, 423)


def test_a_lock_expires(make_database: Callable[[str], str]) -> None:
    settings = ready_settings(make_database("auth"), lockout_threshold=1, lockout_seconds=1)
    with TestClient(create_app(settings)) as client:
        register(client)
        client.post("/auth/login", json={"email": EMAIL, "password": "wrong password"})
        locked = client.post("/auth/login", json={"email": EMAIL, "password": PASSWORD})
        assert_problem(locked, 423)
        assert locked.headers["retry-after"] == "1"
        time.sleep(1.1)
        assert login(client)


def test_the_oauth2_password_form_works_like_login(client: TestClient) -> None:
    register(client)
    response = client.post(
        "/auth/token", data={"username": " ADA@example.com", "password": PASSWORD}
    )
    assert response.status_code == 200
    assert response.json()["token_type"] == "bearer"
    wrong = client.post("/auth/token", data={"username": EMAIL, "password": "nope nope"})
    assert_problem(wrong, 401)
    assert_problem(client.post("/auth/token", data={"username": EMAIL}), 422)
    assert_problem(client.post("/auth/token", data={"username": "x", "password": "y"}), 422)


def test_openapi_documents_the_password_flow_and_problems(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert any(
        s.get("flows", {}).get("password", {}).get("tokenUrl") == "/auth/token"
        for s in schemes.values()
    )
    assert "423" in spec["paths"]["/auth/login"]["post"]["responses"]
    assert "409" in spec["paths"]["/auth/register"]["post"]["responses"]


# --- refresh and logout -----------------------------------------------------------------


def test_refresh_rotates_the_pair_and_spends_the_old_refresh_token(client: TestClient) -> None:
    register(client)
    first = login(client)
    second = client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert second.status_code == 200
    pair = second.json()
    assert pair["refresh_token"] != first["refresh_token"]
    third = client.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert third.status_code == 200


def test_a_reused_refresh_token_revokes_its_whole_family(client: TestClient) -> None:
    register(client)
    stolen = login(client)["refresh_token"]
    other_session = login(client)["refresh_token"]
    rotated = client.post("/auth/refresh", json={"refresh_token": stolen}).json()
    reuse = client.post("/auth/refresh", json={"refresh_token": stolen})
    assert_problem(reuse, 401)
    # The legitimate holder's newer token is dead too, other sessions live on.
    assert_problem(
        client.post("/auth/refresh", json={"refresh_token": rotated["refresh_token"]}), 401
    )
    assert client.post("/auth/refresh", json={"refresh_token": other_session}).status_code == 200


def test_an_unknown_refresh_token_is_401_and_revokes_nothing(client: TestClient) -> None:
    register(client)
    pair = login(client)
    before = stored_position(client)
    forged = pair["refresh_token"][:-4] + (
        "AAAA" if not pair["refresh_token"].endswith("AAAA") else "BBBB"
    )
    assert_problem(client.post("/auth/refresh", json={"refresh_token": forged}), 401)
    assert_problem(client.post("/auth/refresh", json={"refresh_token": "garbage"}), 401)
    assert stored_position(client) == before
    assert (
        client.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]}).status_code
        == 200
    )


def test_logout_ends_the_session(client: TestClient) -> None:
    register(client)
    pair = login(client)
    response = client.post("/auth/logout", json={"refresh_token": pair["refresh_token"]})
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(client.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]}), 401)
    again = client.post("/auth/logout", json={"refresh_token": pair["refresh_token"]})
    assert again.status_code == 204
    assert client.post("/auth/logout", json={"refresh_token": "garbage"}).status_code == 204


# --- password change --------------------------------------------------------------------


def test_a_password_change_revokes_every_refresh_token(client: TestClient) -> None:
    register(client)
    a, b = login(client), login(client)
    response = client.post(
        "/auth/password",
        json={"current_password": PASSWORD, "new_password": "a brand new secret"},
        headers=bearer(a["access_token"]),
    )
    assert response.status_code == 204
    for pair in (a, b):
        assert_problem(
            client.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]}), 401
        )
    assert_problem(client.post("/auth/login", json={"email": EMAIL, "password": PASSWORD}), 401)
    assert login(client, password="a brand new secret")


def test_a_password_change_needs_the_current_password(client: TestClient) -> None:
    register(client)
    pair = login(client)
    before = stored_position(client)
    response = client.post(
        "/auth/password",
        json={"current_password": "not my password", "new_password": "a brand new secret"},
        headers=bearer(pair["access_token"]),
    )
    assert_problem(response, 401)
    assert stored_position(client) == before


@pytest.mark.parametrize(
    "body",
    [
        {"current_password": PASSWORD, "new_password": "short"},
        {"current_password": PASSWORD, "new_password": "n" * 129},
        {"current_password": PASSWORD},
        {"current_password": PASSWORD, "new_password": "a brand new secret", "x": 1},
    ],
)
def test_invalid_password_changes_are_422(client: TestClient, body: dict[str, Any]) -> None:
    register(client)
    pair = login(client)
    before = stored_position(client)
    refused = client.post("/auth/password", json=body, headers=bearer(pair["access_token"]))
    assert_problem(refused, 422)
    assert stored_position(client) == before


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer abc.def.ghi"},
    ],
)
def test_a_password_change_without_a_valid_bearer_token_is_401(
    client: TestClient, headers: dict[str, str]
) -> None:
    body = {"current_password": PASSWORD, "new_password": "a brand new secret"}
    assert_problem(client.post("/auth/password", json=body, headers=headers), 401)


# --- secrets never leak -----------------------------------------------------------------


def test_no_response_or_public_contract_contains_a_password_or_a_hash(client: TestClient) -> None:
    bodies = [
        client.post("/auth/register", json={"email": EMAIL, "password": PASSWORD}).text,
        client.post("/auth/register", json={"email": EMAIL, "password": PASSWORD}).text,
        client.post("/auth/login", json={"email": EMAIL, "password": "wrong " + PASSWORD}).text,
        client.post("/auth/register", json={"email": "x", "password": PASSWORD}).text,
    ]
    pair = login(client)
    bodies.append(
        client.post(
            "/auth/password",
            json={"current_password": PASSWORD, "new_password": PASSWORD + "!"},
            headers=bearer(pair["access_token"]),
        ).text
    )
    for body in bodies:
        assert PASSWORD not in body
        assert "$argon2" not in body
    auth = service(client)
    notifications = auth.recorder.select_notifications(start=1, limit=1000)
    published = []
    for notification in notifications:
        contract = to_contract(auth.mapper.to_domain_event(notification))
        if contract is not None:
            published.append(contract.model_dump_json())
    assert len(published) >= 4
    for text in published:
        assert PASSWORD not in text
        assert "argon2" not in text
        assert pair["refresh_token"] not in text


def test_accounts_with_many_logins_are_snapshotted_and_still_work(client: TestClient) -> None:
    register(client)
    for _ in range(48):
        login(client)
    first = login(client)  # version 50: in the snapshot
    for _ in range(3):
        login(client)
    with psycopg.connect(**connection_kwargs(service(client).settings.database_url)) as conn:
        row = conn.execute("SELECT count(*) FROM auth_snapshots").fetchone()
    assert row is not None
    assert row[0] >= 1
    fresh = client.post("/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert fresh.status_code == 200


def test_health_probes(client: TestClient) -> None:
    assert client.get("/health/live").status_code == 200
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == ["database"]
