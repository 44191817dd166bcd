"""DELETE /auth/account against a real PostgreSQL (and, for the relay, RabbitMQ): the account
ends, every session with it, the person's key is destroyed, the address registers again as a
new account; ids derived from an address are keyed, and legacy (uuid5) ones are still found."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from auth_svc.application import AuthService
from auth_svc.contracts import to_contract
from auth_svc.domain import (
    Account,
    EmailRegistration,
    legacy_registration_id,
    registration_id,
)
from auth_svc.main import create_app
from auth_svc.main import relay as auth_relay
from auth_svc.settings import AuthSettings
from servicekit.shredding import new_service_key
from shared_contracts.events import AccountDeleted, SessionRevoked
from shared_contracts.names import AUTH_EVENTS
from testbed.auth import auth_database
from tests.support.amqp import subscribed
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

NEW_PASSWORD = "a brand new secret"


def deletion_settings(database_url: str, **overrides: Any) -> AuthSettings:
    """Cheap hashing, auth_svc's tables, an address id key and a personal data key."""
    fields: dict[str, Any] = {
        "address_id_key": secrets.token_urlsafe(32),
        "personal_data_key": new_service_key(),
        **overrides,
    }
    return auth_database(database_url, **fields)


@pytest.fixture
def settings(make_database: Callable[[str], str]) -> AuthSettings:
    return deletion_settings(make_database("auth_delete"))


@pytest.fixture
def client(settings: AuthSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def stored_events(client: TestClient, after: int = 0) -> list[Any]:
    auth = service(client)
    notifications = auth.recorder.select_notifications(start=after + 1, limit=10_000)
    return [auth.mapper.to_domain_event(n) for n in notifications]


def delete_account(
    client: TestClient, access_token: str | None, password: str = PASSWORD
) -> httpx.Response:
    headers = bearer(access_token) if access_token else {}
    response: httpx.Response = client.request(
        "DELETE", "/auth/account", json={"password": password}, headers=headers
    )
    return response


def without_request_id(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "request_id"}


# --- deletion ---------------------------------------------------------------------------


def test_a_deleted_account_cannot_log_in_and_every_session_ends(client: TestClient) -> None:
    user_id = uuid.UUID(register(client)["user_id"])
    first, second = login(client), login(client)
    before = stored_position(client)

    response = delete_account(client, first["access_token"])

    assert response.status_code == 202, response.text
    assert response.json()["detail"]
    login_refused = client.post("/auth/login", json={"email": EMAIL, "password": PASSWORD})
    unknown = client.post("/auth/login", json={"email": "bob@example.com", "password": PASSWORD})
    assert without_request_id(assert_problem(login_refused, 401)) == without_request_id(
        assert_problem(unknown, 401)
    )
    for pair in (first, second):
        refreshed = client.post("/auth/refresh", json={"refresh_token": pair["refresh_token"]})
        assert_problem(refreshed, 401)
        assert_problem(client.get("/auth/sessions", headers=bearer(pair["access_token"])), 401)
    events = stored_events(client, before)
    assert [type(e).__qualname__ for e in events] == [
        "Account.RefreshFamilyRevoked",
        "Account.RefreshFamilyRevoked",
        "Account.Deleted",
        "EmailRegistration.Released",
    ]
    contracts = [to_contract(e) for e in events]
    revoked = [c for c in contracts if isinstance(c, SessionRevoked)]
    assert {c.reason for c in revoked} == {"account_deleted"}
    assert len({c.session_id for c in revoked}) == 2
    assert contracts[2] == AccountDeleted(user_id=user_id)
    assert contracts[3] is None  # the address's release is private
    assert service(client).person_erased_at(user_id) is not None


def test_the_deleted_accounts_personal_fields_read_as_erased(client: TestClient) -> None:
    response = client.post(
        "/auth/register", json={"email": EMAIL, "password": PASSWORD, "display_name": "Ada"}
    )
    user_id = uuid.UUID(response.json()["user_id"])
    pair = login(client)
    assert delete_account(client, pair["access_token"]).status_code == 202
    account = service(client).get_account(user_id)
    assert account.deleted
    assert account.email is None
    assert account.display_name is None
    registered = next(e for e in stored_events(client) if isinstance(e, Account.Registered))
    assert registered.email is None


def test_a_wrong_password_erases_nothing(client: TestClient) -> None:
    user_id = uuid.UUID(register(client)["user_id"])
    pair = login(client)
    before = stored_position(client)
    refused = delete_account(client, pair["access_token"], password="not my password")
    assert_problem(refused, 401)
    assert stored_position(client) == before
    assert service(client).person_erased_at(user_id) is None
    assert login(client)
    assert client.get("/auth/sessions", headers=bearer(pair["access_token"])).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer abc.def.ghi"},
    ],
)
def test_a_deletion_without_a_valid_bearer_token_is_401_and_erases_nothing(
    client: TestClient, headers: dict[str, str]
) -> None:
    register(client)
    login(client)
    before = stored_position(client)
    refused = client.request(
        "DELETE", "/auth/account", json={"password": PASSWORD}, headers=headers
    )
    assert_problem(refused, 401)
    assert stored_position(client) == before
    assert login(client)


def test_the_token_of_an_ended_session_cannot_delete_the_account(client: TestClient) -> None:
    register(client)
    ended = login(client)
    client.post("/auth/logout", json={"refresh_token": ended["refresh_token"]})
    before = stored_position(client)
    assert_problem(delete_account(client, ended["access_token"]), 401)
    assert stored_position(client) == before


@pytest.mark.parametrize(
    "body",
    [{}, {"password": ""}, {"password": 12345678}, {"password": PASSWORD, "x": 1}, []],
)
def test_invalid_deletion_bodies_are_422_and_erase_nothing(client: TestClient, body: Any) -> None:
    register(client)
    pair = login(client)
    before = stored_position(client)
    refused = client.request(
        "DELETE", "/auth/account", json=body, headers=bearer(pair["access_token"])
    )
    assert_problem(refused, 422)
    malformed = client.request(
        "DELETE",
        "/auth/account",
        content=b'{"password": ',
        headers={**bearer(pair["access_token"]), "content-type": "application/json"},
    )
    assert_problem(malformed, 400)
    assert stored_position(client) == before


def test_a_deleted_address_gets_no_reset_link(client: TestClient) -> None:
    register(client)
    other_id = uuid.UUID(register(client, "bob@example.com")["user_id"])
    assert delete_account(client, login(client)["access_token"]).status_code == 202
    before = stored_position(client)
    for email in (EMAIL, "bob@example.com"):  # one worker, in this order
        forgot = client.post("/auth/password/forgot", json={"email": email})
        assert forgot.status_code == 202
    for _ in range(200):
        requested = [
            e
            for e in stored_events(client, before)
            if isinstance(e, Account.PasswordResetRequested)
        ]
        if requested:
            break
        time.sleep(0.05)
    assert [e.originator_id for e in requested] == [other_id]


def test_deleting_twice_is_410_never_500(client: TestClient) -> None:
    register(client)
    pair = login(client)
    assert delete_account(client, pair["access_token"]).status_code == 202
    before = stored_position(client)
    for _ in range(2):
        assert_problem(delete_account(client, pair["access_token"]), 410)
    assert stored_position(client) == before


def test_concurrent_deletions_delete_once_and_none_is_a_500(client: TestClient) -> None:
    register(client)
    pair = login(client)
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(
            pool.map(lambda _: delete_account(client, pair["access_token"]).status_code, range(6))
        )
    assert statuses.count(202) >= 1, statuses
    assert set(statuses) <= {202, 410}, statuses
    deleted = [e for e in stored_events(client) if isinstance(e, Account.Deleted)]
    assert len(deleted) == 1


def test_a_deletion_interrupted_before_the_shredding_is_finished_by_repeating_it(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_id = uuid.UUID(register(client)["user_id"])
    pair = login(client)
    auth = service(client)

    def crash(subject: uuid.UUID) -> bool:
        raise RuntimeError("the process died here")

    with monkeypatch.context() as patched:
        patched.setattr(auth, "erase_person", crash)
        with pytest.raises(RuntimeError):
            delete_account(client, pair["access_token"])
    assert auth.get_account(user_id).deleted
    assert auth.person_erased_at(user_id) is None
    # Meanwhile the address is already free and the account refuses logins.
    assert_problem(client.post("/auth/login", json={"email": EMAIL, "password": PASSWORD}), 401)

    assert_problem(delete_account(client, pair["access_token"], "not my password"), 401)
    assert auth.person_erased_at(user_id) is None
    assert delete_account(client, pair["access_token"]).status_code == 202
    assert auth.person_erased_at(user_id) is not None
    assert_problem(delete_account(client, pair["access_token"]), 410)
    assert len([e for e in stored_events(client) if isinstance(e, Account.Deleted)]) == 1


def test_without_a_personal_data_key_a_deletion_is_refused_and_changes_nothing(
    make_database: Callable[[str], str],
) -> None:
    settings = deletion_settings(make_database("auth_delete"), personal_data_key=None)
    with TestClient(create_app(settings)) as client:
        register(client)
        pair = login(client)
        before = stored_position(client)
        assert_problem(delete_account(client, pair["access_token"]), 503)
        assert stored_position(client) == before
        assert login(client)


# --- the address registers again ------------------------------------------------------


def test_the_address_registers_again_as_a_new_account(client: TestClient) -> None:
    old_id = register(client)["user_id"]
    old = login(client)
    assert delete_account(client, old["access_token"]).status_code == 202

    new_id = register(client, password=NEW_PASSWORD)["user_id"]

    assert new_id != old_id
    pair = login(client, password=NEW_PASSWORD)
    sessions = client.get("/auth/sessions", headers=bearer(pair["access_token"])).json()
    assert len(sessions["sessions"]) == 1  # nothing of the old account
    assert_problem(client.post("/auth/login", json={"email": EMAIL, "password": PASSWORD}), 401)
    assert_problem(client.post("/auth/refresh", json={"refresh_token": old["refresh_token"]}), 401)
    assert service(client).account_id_for(EMAIL) == uuid.UUID(new_id)
    # The new account is deleted in turn, and the address comes back once more.
    assert delete_account(client, pair["access_token"], NEW_PASSWORD).status_code == 202
    assert register(client)["user_id"] not in (old_id, new_id)


def test_two_registrations_racing_for_a_released_address_give_one_account(
    client: TestClient,
) -> None:
    register(client)
    assert delete_account(client, login(client)["access_token"]).status_code == 202
    before = stored_position(client)

    def attempt(i: int) -> int:
        body = {"email": EMAIL, "password": f"password-{i}"}
        status: int = client.post("/auth/register", json=body).status_code
        return status

    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = list(pool.map(attempt, range(10)))
    assert statuses.count(201) == 1, statuses
    assert statuses.count(409) == 9, statuses
    names = [type(e).__qualname__ for e in stored_events(client, before)]
    assert names == ["Account.Registered", "EmailRegistration.Reclaimed"]


# --- keyed address ids, and registrations stored before them --------------------------------


def test_the_registration_id_is_keyed_not_a_uuid5_of_the_address(
    client: TestClient, settings: AuthSettings
) -> None:
    user_id = uuid.UUID(register(client)["user_id"])
    (claimed,) = [e for e in stored_events(client) if isinstance(e, EmailRegistration.Claimed)]
    keyed = registration_id(EMAIL, settings.address_id_secret)
    assert claimed.originator_id == keyed
    assert claimed.account_id == user_id
    assert keyed != legacy_registration_id(EMAIL)
    assert keyed.version == 8
    assert list(service(client).recorder.select_events(legacy_registration_id(EMAIL))) == []


def legacy_account(auth: AuthService, email: str = EMAIL) -> uuid.UUID:
    """An account and its registration as stored before ids were keyed (uuid5 id)."""
    now = datetime.now(UTC)
    account = Account.register(
        email=email, password_hash=auth.passwords.hash(PASSWORD), display_name=None, now=now
    )
    registration = EmailRegistration.claim(
        account, registration_id=legacy_registration_id(email), now=now
    )
    auth.save(account, registration)
    return account.id


def test_an_account_registered_under_the_legacy_id_still_logs_in(client: TestClient) -> None:
    account_id = legacy_account(service(client))
    pair = login(client, email=" ADA@example.com")
    assert pair["token_type"] == "bearer"
    assert service(client).account_id_for(EMAIL) == account_id
    taken = client.post("/auth/register", json={"email": EMAIL, "password": PASSWORD})
    assert_problem(taken, 409)


def test_a_legacy_address_released_by_a_deletion_registers_again_under_the_keyed_id(
    client: TestClient, settings: AuthSettings
) -> None:
    legacy_id = legacy_account(service(client))
    assert delete_account(client, login(client)["access_token"]).status_code == 202
    new_id = uuid.UUID(register(client, password=NEW_PASSWORD)["user_id"])
    assert new_id != legacy_id
    assert login(client, password=NEW_PASSWORD)
    reclaimed = [e for e in stored_events(client) if isinstance(e, EmailRegistration.Claimed)]
    assert [e.originator_id for e in reclaimed] == [
        legacy_registration_id(EMAIL),
        registration_id(EMAIL, settings.address_id_secret),
    ]


def test_the_openapi_document_describes_the_deletion(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/auth/account"]["delete"]
    assert operation["operationId"] == "deleteAccount"
    assert {"202", "401", "410", "422"} <= operation["responses"].keys()
    assert "requestBody" in operation


# --- the relay ------------------------------------------------------------------------------


async def test_the_relay_publishes_the_revocations_then_auth_account_deleted(
    make_database: Callable[[str], str], amqp_url: str
) -> None:
    settings = deletion_settings(make_database("auth_delete"), amqp_url=amqp_url)

    def delete_an_account() -> uuid.UUID:
        with TestClient(create_app(settings)) as client:
            user_id = uuid.UUID(register(client)["user_id"])
            assert delete_account(client, login(client)["access_token"]).status_code == 202
            return user_id

    user_id = await asyncio.to_thread(delete_an_account)
    relay = auth_relay(settings)
    stop = asyncio.Event()
    async with subscribed(amqp_url, AUTH_EVENTS, "auth.#") as received:
        task = asyncio.create_task(relay.run(stop))
        try:
            for _ in range(300):
                if any(b["event_type"] == "auth.account.deleted" for b in received.bodies):
                    break
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=15)
            relay.app.close()
    types = [b["event_type"] for b in received.bodies]
    assert types[-2:] == ["auth.session.revoked", "auth.account.deleted"], types
    deleted = received.bodies[-1]
    assert deleted["data"] == {"user_id": str(user_id)}
    assert deleted["aggregate_id"] == str(user_id)
    assert received.bodies[-2]["data"]["reason"] == "account_deleted"
