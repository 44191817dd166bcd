"""Stored events written by an older version of a class still load, upcast, and publish the
same public contract.

Each old event is written the way the old code wrote it: an instance of the class as it was
(copied below, with its fields at that version), turned into a stored event by the service's
own mapper and appended to the service's PostgreSQL event store by the library, under the
topic the class has always had. Only the current classes read them back.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import get_topic

from auth_svc.application import AuthService
from auth_svc.contracts import to_contract as auth_contract
from auth_svc.domain import Account
from servicekit.eventstore import EventSourcedApplication, TracedAggregate, eventsourcing_env
from shared_contracts.events import AccountLocked, ProfileUpdated
from user_svc.application import ProfileService
from user_svc.contracts import to_contract as profile_contract
from user_svc.domain import Profile

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
METADATA = {"request_id": "req-old", "correlation_id": "req-old", "causation_id": "req-old"}


# --- the classes as version 1 stored them -------------------------------------------------


class LockedV1(TracedAggregate.Event):
    """`auth_svc.domain:Account.Locked` at class version 1 (before `lockout_seconds`)."""

    locked_until: datetime
    failed_attempts: int


class ProfileUpdatedV1(TracedAggregate.Event):
    """`user_svc.domain:Profile.Updated` at class version 1 (before `source`)."""

    changes: dict[str, str | None]
    state: dict[str, str | None]


def append_as_v1(
    app: EventSourcedApplication, current: type[Any], old_event: Aggregate.Event
) -> StoredEvent:
    """Store `old_event` as the old code did: same mapper, the current class's topic."""
    stored = dataclasses.replace(app.mapper.to_stored_event(old_event), topic=get_topic(current))
    app.recorder.insert_events([stored])
    return stored


def stored_state(app: EventSourcedApplication, aggregate_id: uuid.UUID) -> list[dict[str, Any]]:
    """Each stored event's state as the library's transcoder reads it, before any upcast."""
    return [app.mapper.transcoder.decode(s.state) for s in app.recorder.select_events(aggregate_id)]


def last_event(app: EventSourcedApplication) -> Any:
    """The newest event of the notification log, as a relay reads it."""
    newest = app.recorder.max_notification_id() or 0
    (notification,) = app.recorder.select_notifications(newest, 1)
    return app.mapper.to_domain_event(notification)


# --- auth_svc -----------------------------------------------------------------------------


@pytest.fixture
def auth_env(make_database: Callable[[str], str]) -> Iterator[dict[str, str]]:
    env = eventsourcing_env(make_database("upcast_auth"), create_table=True, pool_size=2)
    AuthService(env=env).close()
    yield env


def new_account(app: AuthService, failures: int) -> Account:
    account = Account.register(
        email=f"old-{uuid.uuid4().hex[:8]}@example.com",
        password_hash="$argon2id$not-a-real-hash",
        display_name="Ada",
        now=NOW,
    )
    for n in range(1, failures + 1):
        account.trigger_event(Account.LoginFailed, timestamp=NOW, consecutive_failures=n)
    app.save(account)
    return account


def test_a_lock_stored_at_version_1_loads_and_publishes_the_same_contract(
    auth_env: dict[str, str],
) -> None:
    writer = AuthService(env=auth_env)
    account = new_account(writer, failures=5)
    locked_until = NOW + timedelta(seconds=900)
    append_as_v1(
        writer,
        Account.Locked,
        LockedV1(
            originator_id=account.id,
            originator_version=account.version + 1,
            timestamp=NOW,
            metadata=METADATA,
            locked_until=locked_until,
            failed_attempts=5,
        ),
    )
    writer.close()

    reader = AuthService(env=auth_env)  # a fresh process: nothing cached
    try:
        raw = stored_state(reader, account.id)[-1]
        assert "class_version" not in raw
        assert "lockout_seconds" not in raw

        loaded = reader.repository.get(account.id)
        assert loaded.is_locked(NOW + timedelta(seconds=899))
        assert not loaded.is_locked(NOW + timedelta(seconds=900))
        assert loaded.failed_logins == 0

        event = last_event(reader)
        assert isinstance(event, Account.Locked)
        assert event.lockout_seconds == 900  # derived by upcast_v1_v2
        assert auth_contract(event) == AccountLocked(
            user_id=account.id, locked_until=locked_until, failed_attempts=5
        )
    finally:
        reader.close()


def test_a_lock_is_stored_at_version_2_and_maps_to_the_same_contract_as_version_1(
    auth_env: dict[str, str],
) -> None:
    app = AuthService(env=auth_env)
    try:
        account = new_account(app, failures=4)
        account.record_failed_login(now=NOW, threshold=5, lockout_seconds=600)
        app.save(account)

        raw = stored_state(app, account.id)[-1]
        assert raw["class_version"] == 2
        assert raw["lockout_seconds"] == 600

        event = last_event(app)
        assert isinstance(event, Account.Locked)
        assert auth_contract(event) == AccountLocked(
            user_id=account.id, locked_until=NOW + timedelta(seconds=600), failed_attempts=5
        )
    finally:
        app.close()


# --- user_svc -----------------------------------------------------------------------------


@pytest.fixture
def users_env(make_database: Callable[[str], str]) -> Iterator[dict[str, str]]:
    env = eventsourcing_env(make_database("upcast_users"), create_table=True, pool_size=2)
    ProfileService(env=env).close()
    yield env


def test_profile_updates_stored_at_version_1_load_and_publish_the_same_contracts(
    users_env: dict[str, str],
) -> None:
    writer = ProfileService(env=users_env)
    user_id = uuid.uuid4()
    profile = Profile.create(user_id, email=None)
    writer.save(profile)
    filled_in = {"email": "ada@example.com", "display_name": "Ada"}
    state = {**profile.state(), **filled_in}
    edited = {"bio": "Analyst"}
    v1_events = [
        # the registration event filling in a profile made before it (it sets the address)
        ProfileUpdatedV1(
            originator_id=user_id,
            originator_version=2,
            timestamp=NOW,
            metadata=METADATA,
            changes=filled_in,
            state=state,
        ),
        # the user's own edit
        ProfileUpdatedV1(
            originator_id=user_id,
            originator_version=3,
            timestamp=NOW + timedelta(seconds=1),
            metadata=METADATA,
            changes=edited,
            state={**state, **edited},
        ),
    ]
    for old_event in v1_events:
        append_as_v1(writer, Profile.Updated, old_event)
    writer.close()

    reader = ProfileService(env=users_env)
    try:
        assert ["class_version" in raw for raw in stored_state(reader, user_id)] == [False] * 3

        loaded = reader.repository.get(user_id)
        assert loaded.version == 3
        assert loaded.state() == {**state, **edited}

        updates = [
            e for e in reader.repository.event_store.get(user_id) if e.originator_version > 1
        ]
        assert [type(e) for e in updates] == [Profile.Updated, Profile.Updated]
        # The address only ever changes from a registration; the other change is not known.
        assert [e.source for e in updates] == ["registration", None]
        assert [profile_contract(e) for e in updates] == [
            ProfileUpdated(user_id=user_id, **state, changed=["display_name", "email"]),
            ProfileUpdated(user_id=user_id, **{**state, **edited}, changed=["bio"]),
        ]
    finally:
        reader.close()


def test_profile_updates_are_stored_at_version_2_with_their_source(
    users_env: dict[str, str],
) -> None:
    app = ProfileService(env=users_env)
    try:
        user_id = uuid.uuid4()
        profile = Profile.create(user_id, email=None)
        profile.fill_in_from_registration("bo@example.com", "Bo")
        profile.update({"bio": "Analyst"})
        app.save(profile)

        raws = stored_state(app, user_id)
        assert [raw.get("class_version") for raw in raws] == [None, 2, 2]
        assert [raw.get("source") for raw in raws] == [None, "registration", "user"]
        loaded = app.repository.get(user_id)
        assert loaded.state()["bio"] == "Analyst"
        event = last_event(app)
        assert profile_contract(event) == ProfileUpdated(
            user_id=user_id, **loaded.state(), changed=["bio"]
        )
    finally:
        app.close()
