"""Many writers on one aggregate: in one process they take turns, across replicas they back
off; nobody gets a 500, and no write is lost (real PostgreSQL)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from auth_svc.domain import Account
from auth_svc.main import create_app as create_auth_app
from servicekit.aggregates import Contended
from servicekit.eventstore import eventsourcing_env
from testbed.auth import auth_database
from tests.integration.test_user_api import auth, token_keys
from tests.support.api import EMAIL, PASSWORD, register
from user_svc.application import ProfileService, StaleProfileVersion
from user_svc.main import create_app, init_db
from user_svc.settings import UserSettings


@pytest.fixture(scope="module")
def database_url(make_database: Callable[[str], str]) -> str:
    url = make_database("users_hot")
    init_db(UserSettings(database_url=url))
    return url


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    app = create_app(UserSettings(database_url=database_url), token_keys=token_keys)
    with TestClient(app) as test_client:
        yield test_client


def turns_observed() -> tuple[float, float]:
    """(turns, commands) on the users application so far."""
    turns = REGISTRY.get_sample_value("aggregate_turn_commands_count", {"app": "users"}) or 0.0
    commands = REGISTRY.get_sample_value("aggregate_turn_commands_sum", {"app": "users"}) or 0.0
    return turns, commands


def test_sixty_four_concurrent_patches_of_one_profile_all_apply_in_turns(
    client: TestClient,
) -> None:
    user = uuid.uuid4()
    headers = auth(user)
    assert client.get("/users/me", headers=headers).json()["version"] == 1
    turns_before, commands_before = turns_observed()
    start = threading.Barrier(64)

    def patch(i: int) -> tuple[int, dict[str, object]]:
        start.wait()
        response = client.patch("/users/me", headers=headers, json={"bio": f"writer {i}"})
        return response.status_code, response.json()

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(patch, range(64)))

    assert [status for status, _ in answers] == [200] * 64
    # An answer shows the profile after its own edit, or a newer state the cache already has.
    assert all(2 <= body["version"] <= 65 for _, body in answers)
    assert client.get("/users/me", headers=headers).json()["version"] == 65
    service: ProfileService = client.app.state.profiles.service  # type: ignore[attr-defined]
    bios = [e.changes["bio"] for e in service.events.get(user) if hasattr(e, "changes")]
    assert sorted(bios) == sorted(f"writer {i}" for i in range(64)), "each edit stored once"
    turns, commands = turns_observed()
    assert commands - commands_before == 64
    assert turns - turns_before < 64, "edits that queued were saved together"


def test_if_match_is_checked_in_arrival_order_within_a_turn(client: TestClient) -> None:
    user = uuid.uuid4()
    headers = auth(user)
    etag = client.get("/users/me", headers=headers).headers["etag"]
    start = threading.Barrier(32)

    def patch(i: int) -> int:
        start.wait()
        response = client.patch(
            "/users/me", headers={**headers, "If-Match": etag}, json={"bio": f"writer {i}"}
        )
        return response.status_code

    with ThreadPoolExecutor(32) as pool:
        statuses = sorted(pool.map(patch, range(32)))
    assert statuses == [200] + [412] * 31


def test_replicas_writing_one_profile_back_off_and_lose_nothing(database_url: str) -> None:
    replicas = [ProfileService(env=eventsourcing_env(database_url, pool_size=8)) for _ in range(3)]
    user = uuid.uuid4()
    replicas[0].get_or_create(user, "ada@example.com")
    outcomes: list[str] = []

    def write(i: int) -> None:
        replica = replicas[i % len(replicas)]
        try:
            replica.update(user, {"bio": f"writer {i}"})
            outcomes.append("applied")
        except Contended:
            outcomes.append("503")

    try:
        with ThreadPoolExecutor(24) as pool:
            list(pool.map(write, range(120)))
        applied = outcomes.count("applied")
        assert set(outcomes) <= {"applied", "503"}
        assert applied >= 110, outcomes.count("503")
        view = replicas[1].public_profile(user)
        assert view is not None
        assert view.version == 1 + applied, "every applied edit is stored, once"
        with pytest.raises(StaleProfileVersion):
            replicas[2].update(user, {"bio": "late"}, expected_version=1)
    finally:
        for replica in replicas:
            replica.close()


@pytest.fixture
def auth_client(make_database: Callable[[str], str]) -> Iterator[TestClient]:
    settings = auth_database(make_database("auth_hot"), db_pool_size=10, lockout_threshold=3)
    with TestClient(create_auth_app(settings)) as c:
        yield c


def test_concurrent_logins_to_one_account_all_succeed(auth_client: TestClient) -> None:
    user_id = register(auth_client)["user_id"]

    def log_in(_: int) -> int:
        response = auth_client.post("/auth/login", json={"email": EMAIL, "password": PASSWORD})
        return response.status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(log_in, range(48)))
    assert statuses == [200] * 48
    service = auth_client.app.state.auth_service  # type: ignore[attr-defined]
    account: Account = service.get_account(uuid.UUID(user_id))
    assert len(account.refresh_families) == min(48, len(account.refresh_families))
    logins = [e for e in service.events.get(account.id) if type(e).__name__ == "LoginSucceeded"]
    assert len(logins) == 48


def test_concurrent_wrong_passwords_lock_the_account_exactly_once(
    auth_client: TestClient,
) -> None:
    user_id = uuid.UUID(register(auth_client)["user_id"])

    def wrong(_: int) -> int:
        response = auth_client.post("/auth/login", json={"email": EMAIL, "password": "nope-nope"})
        return response.status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(wrong, range(24)))
    assert set(statuses) <= {401, 423}
    service = auth_client.app.state.auth_service  # type: ignore[attr-defined]
    kinds = [type(e).__name__ for e in service.events.get(user_id)]
    assert kinds.count("LoginFailed") == 3, "the threshold, not one failure more"
    assert kinds.count("Locked") == 1
    assert statuses.count(401) == 3
