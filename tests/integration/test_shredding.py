"""Crypto-shredding on the real PostgreSQL: the event tables hold no personal data in plain,
an erased person's aggregates still load with their fields erased, the relays skip or null
what was erased, and user_svc erases a profile on `auth.account.deleted`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from itertools import count
from typing import Any

import psycopg
import pytest

from auth_svc.application import AuthService, Client
from auth_svc.contracts import to_contract as auth_contract
from auth_svc.main import init_db as init_auth_db
from auth_svc.settings import AuthSettings
from servicekit.eventstore import connection_kwargs, eventsourcing_env
from servicekit.relay import Relay
from servicekit.shredding import new_service_key
from shared_contracts.envelope import Envelope, event_id_for
from shared_contracts.events import (
    AccountDeleted,
    AccountRegistered,
    ContractEvent,
    ProfileCreated,
    ProfileUpdated,
)
from user_svc.application import ProfileService
from user_svc.contracts import to_contract as profile_contract
from user_svc.domain import Profile, ProfileErased
from user_svc.main import init_db as init_user_db
from user_svc.settings import UserSettings

_positions = count(1)


def raw_rows(database_url: str, table: str) -> list[bytes]:
    """Every stored state of `table`, straight from PostgreSQL (no library in between)."""
    with psycopg.connect(**connection_kwargs(database_url)) as conn:
        return [bytes(r[0]) for r in conn.execute(f"SELECT state FROM {table}")]  # noqa: S608


def mapped(relay: Relay) -> list[ContractEvent | None]:
    """What the relay would publish from the start of the log (no broker needed to map)."""
    batch = relay._next_batch(0)
    assert batch.last_position == relay.app.recorder.max_notification_id()
    return [relay.to_contract(relay.app.mapper.to_domain_event(n)) for n in _notifications(relay)]


def _notifications(relay: Relay) -> list[Any]:
    return list(relay.app.recorder.select_notifications(start=1, limit=1000))


# --- auth_svc -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_settings(make_database: Callable[[str], str]) -> AuthSettings:
    settings = AuthSettings(
        database_url=make_database("shred_auth"),
        personal_data_key=new_service_key(),
        argon2_time_cost=1,
        argon2_memory_kib=1024,
    )
    init_auth_db(settings)
    return settings


@pytest.fixture
def auth(auth_settings: AuthSettings) -> Iterator[AuthService]:
    env = eventsourcing_env(
        auth_settings.database_url,
        pool_size=2,
        extra={"AGGREGATE_CACHE_MAXSIZE": "100", **auth_settings.personal_data_env()},
    )
    app = AuthService(env=env, settings=auth_settings)
    yield app
    app.close()


def test_auth_events_and_snapshots_hold_no_address_name_or_client_in_plain(
    auth: AuthService, auth_settings: AuthSettings
) -> None:
    email = f"ada-{uuid.uuid4().hex[:8]}@example.com"
    user_id = auth.register(email, "correct horse battery staple", display_name="Ada Shredded")
    account = auth.get_account(user_id)
    client = Client(user_agent="Shredbrowser/7.1", ip="198.51.100.23")
    for _ in range(60):  # past SNAPSHOT_EVERY: a snapshot carries the whole state
        account.record_login(
            family_id=uuid.uuid4(),
            refresh_token_hash=uuid.uuid4().hex,
            refresh_expires_at=datetime(2099, 1, 1, tzinfo=UTC),
            now=datetime.now(UTC),
            user_agent=client.user_agent,
            client_ip=client.ip,
        )
    auth.save(account)
    url = auth_settings.database_url
    rows = raw_rows(url, "auth_events") + raw_rows(url, "auth_snapshots")
    assert raw_rows(url, "auth_snapshots"), "no snapshot was taken"
    for secret in (email, "Ada Shredded", "Shredbrowser", "198.51.100.23"):
        assert not [r for r in rows if secret.encode() in r], secret
    fresh = AuthService(env=_env_of(auth_settings), settings=auth_settings)  # nothing cached
    try:
        loaded = fresh.get_account(user_id)
        assert (loaded.email, loaded.display_name) == (email, "Ada Shredded")
        assert fresh.account_id_for(email) == user_id
    finally:
        fresh.close()


def _env_of(settings: AuthSettings) -> dict[str, str]:
    return eventsourcing_env(settings.database_url, pool_size=2, extra=settings.personal_data_env())


def test_an_erased_account_loads_erased_and_its_registration_is_not_published(
    auth: AuthService, auth_settings: AuthSettings
) -> None:
    email = f"bob-{uuid.uuid4().hex[:8]}@example.com"
    user_id = auth.register(email, "correct horse battery staple", display_name="Bob")
    relay = Relay.of_store(
        AuthService, auth_settings, producer="auth_svc", exchange="x", to_contract=auth_contract
    )
    try:
        before = [c for c in mapped(relay) if isinstance(c, AccountRegistered)]
        assert email in [c.email for c in before]
        assert auth.erase_person(user_id) is True
        assert auth.erase_person(user_id) is False
        assert auth.person_erased_at(user_id) is not None
        account: Any = auth.get_account(user_id)  # its str fields now read None
        assert (account.email, account.display_name) == (None, None)
        assert account.password_hash is None  # derived from their secret: erased too
        assert account.verification  # not personal: intact
        # The relay's own process still holds the key for a while (KEY_CACHE_SECONDS): a
        # fresh one, as after that bound, maps from the shredded store.
        relay.app.close()
        relay = Relay.of_store(
            AuthService, auth_settings, producer="auth_svc", exchange="x", to_contract=auth_contract
        )
        after = [c for c in mapped(relay) if isinstance(c, AccountRegistered)]
        assert email not in [c.email for c in after]
        assert user_id not in [c.user_id for c in after]  # required field erased: skipped
        assert len(after) == len(before) - 1
    finally:
        relay.app.close()


# --- user_svc -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user_settings(make_database: Callable[[str], str]) -> UserSettings:
    settings = UserSettings(
        database_url=make_database("shred_users"), personal_data_key=new_service_key()
    )
    init_user_db(settings)
    return settings


@pytest.fixture
def profiles(user_settings: UserSettings) -> Iterator[ProfileService]:
    env = eventsourcing_env(
        user_settings.database_url,
        pool_size=4,
        extra={
            "AGGREGATE_CACHE_MAXSIZE": "100",
            "AGGREGATE_CACHE_FASTFORWARD": "y",
            **user_settings.personal_data_env(),
        },
    )
    app = ProfileService(env=env)
    yield app
    app.close()


def test_profile_events_hold_no_address_name_or_bio_in_plain(
    profiles: ProfileService, user_settings: UserSettings
) -> None:
    user_id = uuid.uuid4()
    profiles.update(user_id, {"display_name": "Carol Plain"}, email="carol@example.org")
    profiles.update(user_id, {"bio": "Writes about shredding", "locale": "en-GB"})
    rows = raw_rows(user_settings.database_url, "users_events")
    for secret in ("carol@example.org", "Carol Plain", "Writes about shredding", "en-GB"):
        assert not [r for r in rows if secret.encode() in r], secret
    view = profiles.public_profile(user_id)
    assert view is not None
    assert (view.display_name, view.bio) == ("Carol Plain", "Writes about shredding")


def deleted(user_id: uuid.UUID, position: int | None = None) -> Envelope:
    return Envelope(
        event_id=event_id_for("auth_svc", user_id, 99),
        event_type=AccountDeleted.event_type,
        schema_version=AccountDeleted.schema_version,
        occurred_at=datetime.now(UTC),
        producer=AccountDeleted.producer,
        aggregate_id=user_id,
        aggregate_version=99,
        position=position or 1_000_000 + next(_positions),
        correlation_id="req-delete",
        causation_id="req-delete",
        data=AccountDeleted(user_id=user_id).model_dump(mode="json"),
    )


def registered(user_id: uuid.UUID, position: int) -> Envelope:
    return Envelope(
        event_id=event_id_for("auth_svc", user_id, 1),
        event_type=AccountRegistered.event_type,
        schema_version=AccountRegistered.schema_version,
        occurred_at=datetime.now(UTC),
        producer=AccountRegistered.producer,
        aggregate_id=user_id,
        aggregate_version=1,
        position=position,
        correlation_id="req-register",
        causation_id="req-register",
        data=AccountRegistered(
            user_id=user_id, email="late@example.org", display_name="Late"
        ).model_dump(mode="json"),
    )


def erasure_rows(settings: UserSettings, user_id: uuid.UUID) -> list[Any]:
    with psycopg.connect(**connection_kwargs(settings.database_url)) as conn:
        return conn.execute(
            "SELECT erased_at FROM public.erasures WHERE user_id = %s", (user_id,)
        ).fetchall()


def test_account_deleted_erases_the_profile_once_under_redelivery(
    profiles: ProfileService, user_settings: UserSettings
) -> None:
    user_id = uuid.uuid4()
    profiles.update(user_id, {"display_name": "Dora", "bio": "bio of Dora"}, email="d@x.org")
    envelope = deleted(user_id)

    assert profiles.on_account_deleted(envelope) == "applied"
    assert profiles.on_account_deleted(envelope) == "duplicate"  # a redelivery

    events = list(profiles.events.get(user_id))
    assert [type(e) for e in events[-1:]] == [Profile.Erased]
    assert sum(isinstance(e, Profile.Erased) for e in events) == 1
    assert profiles.person_erased_at(user_id) is not None
    assert len(erasure_rows(user_settings, user_id)) == 1
    assert profiles.tracked_position("auth_svc") >= envelope.position
    with pytest.raises(ProfileErased):
        profiles.get_or_create(user_id, "d@x.org")
    with pytest.raises(ProfileErased):
        profiles.update(user_id, {"bio": "back again"})
    assert profiles.public_profile(user_id) is None
    # Every earlier event still loads, with the personal fields erased.
    created, *_ = events
    assert isinstance(created, Profile.Created)
    assert (created.email, created.display_name) == (None, None)
    # A registration redelivered after the deletion brings nothing back.
    assert profiles.on_account_registered(registered(user_id, envelope.position - 1)) == (
        "duplicate"
    )
    assert (
        list(profiles.events.get(user_id))[-1].originator_version == events[-1].originator_version
    )


def test_account_deleted_without_a_profile_leaves_an_erased_one(
    profiles: ProfileService, user_settings: UserSettings
) -> None:
    user_id = uuid.uuid4()
    envelope = deleted(user_id)
    assert profiles.on_account_deleted(envelope) == "applied"
    assert len(erasure_rows(user_settings, user_id)) == 1
    later = registered(user_id, envelope.position + 1)
    assert profiles.on_account_registered(later) == "duplicate"
    assert profiles.public_profile(user_id) is None


def test_the_profile_relay_sends_erased_fields_as_null(
    profiles: ProfileService, user_settings: UserSettings
) -> None:
    user_id = uuid.uuid4()
    profiles.update(user_id, {"display_name": "Eve", "timezone": "Europe/Paris"}, email="e@x.org")
    profiles.on_account_deleted(deleted(user_id))
    relay = Relay.of_store(
        ProfileService,
        user_settings,
        producer="user_svc",
        exchange="x",
        to_contract=profile_contract,
    )
    try:
        mine = [
            c for c in mapped(relay) if c is not None and getattr(c, "user_id", None) == user_id
        ]
    finally:
        relay.app.close()
    assert [type(c) for c in mine] == [ProfileCreated, ProfileUpdated]  # Erased stays private
    for contract in mine:
        assert isinstance(contract, ProfileCreated | ProfileUpdated)
        assert (contract.email, contract.display_name, contract.timezone) == (None, None, None)


def test_the_api_answers_410_for_a_profile_erased_by_the_consumer(
    profiles: ProfileService, user_settings: UserSettings
) -> None:
    from fastapi.testclient import TestClient

    from tests.integration.test_user_api import auth, token_keys
    from tests.support.api import assert_problem
    from user_svc.main import create_app

    user_id = uuid.uuid4()
    app = create_app(user_settings, token_keys=token_keys)
    with TestClient(app) as client:
        assert app.state.cache_follower.following.wait(10)
        headers = auth(user_id)
        client.patch("/users/me", json={"bio": "to be erased"}, headers=headers)
        assert client.get("/users/me", headers=headers).json()["bio"] == "to be erased"
        profiles.on_account_deleted(deleted(user_id))  # the consumer: another process
        deadline = time.monotonic() + 10
        while client.get("/users/me", headers=headers).status_code == 200:
            assert time.monotonic() < deadline, "the API still serves the erased profile"
            time.sleep(0.05)
        assert_problem(client.get("/users/me", headers=headers), 410)
        assert_problem(client.patch("/users/me", json={"bio": "back"}, headers=headers), 410)
        assert_problem(client.get(f"/users/{user_id}", headers=auth(uuid.uuid4())), 404)


def test_processes_making_a_persons_key_at_once_all_get_the_same_one(
    user_settings: UserSettings,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from servicekit.shredding import PersonalKeys, service_key_from

    assert user_settings.personal_data_key
    service_key = service_key_from(user_settings.personal_data_key)
    stores = [
        PersonalKeys(connection_kwargs(user_settings.database_url), service_key) for _ in range(4)
    ]
    subject = uuid.uuid4()
    try:
        with ThreadPoolExecutor(8) as pool:
            ciphers = list(
                pool.map(lambda n: stores[n % 4].cipher_for(subject, create=True), range(16))
            )
        sealed = ciphers[0].encrypt(bytes(12), b"same key?", None)
        assert {c.decrypt(bytes(12), sealed, None) for c in ciphers} == {b"same key?"}
    finally:
        for store in stores:
            store.close()
