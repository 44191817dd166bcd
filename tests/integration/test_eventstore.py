"""The event store under a commit whose answer was lost."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable

import pytest
from eventsourcing.application import ProcessingEvent
from eventsourcing.persistence import IntegrityError

from servicekit.eventstore import eventsourcing_env
from user_svc.application import ProfileService
from user_svc.domain import Profile
from user_svc.main import init_db
from user_svc.settings import UserSettings


@pytest.fixture
def profiles(make_database: Callable[[str], str]) -> ProfileService:
    url = make_database("eventstore")
    init_db(UserSettings(database_url=url))
    return ProfileService(env=eventsourcing_env(url, pool_size=1))


def test_meeting_our_own_landed_commit_again_is_success_not_a_conflict(
    profiles: ProfileService,
) -> None:
    """When the connection breaks after COMMIT was sent, the library retries the insert and
    meets our own rows. That is our write, done: a command must not run again on it (it
    would record a second login)."""
    profile = Profile.create(uuid.uuid4(), email="ada@example.com")
    profile.update({"bio": "first"})
    again = ProcessingEvent()
    again.collect_events(copy.deepcopy(profile))  # the same events, as the retry sends them
    profiles.save(profile)
    assert profiles._record(again) == []
    assert profiles.public_profile(profile.id).bio == "first"  # type: ignore[union-attr]


def test_another_writers_events_at_our_versions_are_still_a_conflict(
    profiles: ProfileService,
) -> None:
    user = uuid.uuid4()
    ours = Profile.create(user, email="ada@example.com")
    theirs = Profile.create(user, email="ada@example.com")
    profiles.save(theirs)
    with pytest.raises(IntegrityError):
        profiles.save(ours)
