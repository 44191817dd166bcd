"""Profiles created from `auth.account.registered`: once, idempotently, one per user."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from itertools import count
from typing import Any

import pytest

from servicekit.eventstore import eventsourcing_env
from shared_contracts.envelope import Envelope, event_id_for
from shared_contracts.events import AccountRegistered, ProfileCreated, ProfileUpdated
from user_svc.application import ProfileService, StaleProfileVersion
from user_svc.contracts import to_contract
from user_svc.domain import Profile
from user_svc.main import init_db
from user_svc.settings import UserSettings

# Positions only grow within one producer, across all tests of this module.
_positions = count(1)
_positions_lock = threading.Lock()


def next_position() -> int:
    with _positions_lock:
        return next(_positions)


def registered(
    user_id: uuid.UUID, *, display_name: str | None = "Ada", position: int | None = None
) -> Envelope:
    data = AccountRegistered(
        user_id=user_id, email=f"{user_id.hex[:8]}@example.com", display_name=display_name
    )
    return Envelope(
        event_id=event_id_for("auth_svc", user_id, 1),
        event_type=AccountRegistered.event_type,
        schema_version=AccountRegistered.schema_version,
        occurred_at=datetime.now(UTC),
        producer=AccountRegistered.producer,
        aggregate_id=user_id,
        aggregate_version=1,
        position=position or next_position(),
        correlation_id=f"req-{user_id.hex[:6]}",
        causation_id="req-register",
        data=data.model_dump(mode="json"),
    )


@pytest.fixture(scope="module")
def service(make_database: Callable[[str], str]) -> Iterator[ProfileService]:
    url = make_database("users_registration")
    init_db(UserSettings(database_url=url))
    app = ProfileService(env=eventsourcing_env(url, pool_size=12))
    yield app
    app.close()


def events_of(service: ProfileService, user_id: uuid.UUID) -> list[Any]:
    return list(service.events.get(user_id))


def test_registration_creates_the_profile(service: ProfileService) -> None:
    user_id = uuid.uuid4()
    envelope = registered(user_id)

    service.on_account_registered(envelope)

    profile = service.public_profile(user_id)
    assert profile is not None
    assert (profile.display_name, profile.email, profile.version) == (
        "Ada",
        f"{user_id.hex[:8]}@example.com",
        1,
    )
    assert service.tracked_position("auth_svc") >= envelope.position


def test_new_events_record_the_message_that_caused_them(service: ProfileService) -> None:
    user_id = uuid.uuid4()
    envelope = registered(user_id)
    service.on_account_registered(envelope)

    [created] = events_of(service, user_id)
    assert created.metadata["correlation_id"] == envelope.correlation_id
    assert created.metadata["causation_id"] == str(envelope.event_id)


def test_a_redelivered_registration_changes_nothing(service: ProfileService) -> None:
    user_id = uuid.uuid4()
    envelope = registered(user_id)
    assert service.on_account_registered(envelope) == "applied"
    service.update(user_id, {"display_name": "Countess"})

    assert service.on_account_registered(envelope) == "duplicate"
    assert service.on_account_registered(envelope) == "duplicate"

    assert len(events_of(service, user_id)) == 2
    profile = service.public_profile(user_id)
    assert profile is not None
    assert profile.display_name == "Countess"


def test_a_retried_registration_below_the_tracked_position_is_applied_once(
    service: ProfileService,
) -> None:
    later = registered(uuid.uuid4())
    service.on_account_registered(later)
    # Dead-lettered earlier, retried after later events were applied (`esctl dlq retry`).
    retried = registered(uuid.uuid4(), position=max(later.position - 1, 1))

    assert service.on_account_registered(retried) == "applied"
    assert service.on_account_registered(retried) == "duplicate"

    assert service.public_profile(retried.aggregate_id) is not None
    assert len(events_of(service, retried.aggregate_id)) == 1
    assert service.tracked_position("auth_svc") == later.position


def test_a_profile_created_by_the_first_request_is_completed_not_duplicated(
    service: ProfileService,
) -> None:
    user_id = uuid.uuid4()
    first = service.get_or_create(user_id, None)
    assert first.display_name is None

    envelope = registered(user_id, display_name="Ada")
    service.on_account_registered(envelope)
    service.on_account_registered(envelope)

    created, filled_in = events_of(service, user_id)
    assert isinstance(created, Profile.Created)
    assert isinstance(filled_in, Profile.Updated)
    assert filled_in.changes == {"display_name": "Ada", "email": f"{user_id.hex[:8]}@example.com"}
    assert filled_in.metadata["causation_id"] == str(envelope.event_id)
    assert service.tracked_position("auth_svc") >= envelope.position


def test_a_name_chosen_before_the_registration_arrives_is_kept(service: ProfileService) -> None:
    user_id = uuid.uuid4()
    service.update(user_id, {"display_name": "Countess"}, email="a@example.com")
    position = service.tracked_position("auth_svc")

    service.on_account_registered(registered(user_id, display_name="Ada"))

    assert len(events_of(service, user_id)) == 2
    profile = service.public_profile(user_id)
    assert profile is not None
    assert profile.display_name == "Countess"
    assert service.tracked_position("auth_svc") > position  # tracked although nothing changed


@pytest.mark.parametrize("attempt", range(5))
def test_registration_racing_first_requests_gives_one_profile(
    service: ProfileService, attempt: int
) -> None:
    user_id = uuid.uuid4()
    envelope = registered(user_id)
    start = threading.Barrier(5)

    def request() -> None:
        start.wait()
        service.get_or_create(user_id, envelope.data["email"])

    def consume() -> None:
        start.wait()
        service.on_account_registered(envelope)

    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(consume)] + [pool.submit(request) for _ in range(4)]
        for future in futures:
            future.result()

    events = events_of(service, user_id)
    assert isinstance(events[0], Profile.Created)
    assert len(events) <= 2
    profile = service.public_profile(user_id)
    assert profile is not None
    assert profile.display_name == "Ada"


def test_update_with_a_stale_version_is_refused(service: ProfileService) -> None:
    user_id = uuid.uuid4()
    service.update(user_id, {"bio": "one"})
    with pytest.raises(StaleProfileVersion) as stale:
        service.update(user_id, {"bio": "two"}, expected_version=1)
    assert stale.value.current.version == 2


def test_stored_events_map_to_contracts(service: ProfileService) -> None:
    user_id = uuid.uuid4()
    service.on_account_registered(registered(user_id))
    service.update(user_id, {"bio": "hi"})

    created, updated = (to_contract(e) for e in events_of(service, user_id))
    assert isinstance(created, ProfileCreated)
    assert isinstance(updated, ProfileUpdated)
    assert updated.changed == ["bio"]
    assert updated.display_name == "Ada"
