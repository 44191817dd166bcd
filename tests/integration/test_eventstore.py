"""The event store under a commit whose answer was lost, and its quiet subscription."""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections.abc import Callable

import pytest
from eventsourcing.application import ProcessingEvent
from eventsourcing.persistence import IntegrityError

from servicekit.eventstore import QuietPostgresSubscription, eventsourcing_env, subscribe
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


def test_the_quiet_subscription_delivers_each_later_append_and_stops(
    profiles: ProfileService,
) -> None:
    """`subscribe` (the profile cache's): its listener blocks on the socket instead of the
    library's 0.1 s loop, and still wakes the subscription for every commit's NOTIFY."""
    start = profiles.recorder.max_notification_id() or 0
    subscription = subscribe(profiles.recorder, gt=start)
    assert isinstance(subscription, QuietPostgresSubscription)
    received: list[uuid.UUID] = []

    def follow() -> None:
        with subscription:
            for notification in subscription:
                received.append(notification.originator_id)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    users = [uuid.uuid4() for _ in range(3)]
    try:
        for user in users:
            profiles.save(Profile.create(user, email=f"{user.hex[:8]}@example.com"))
            time.sleep(0.3)  # separate commits, each with its own NOTIFY
        deadline = time.monotonic() + 30
        while len(received) < len(users) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        subscription.stop()
        follower.join(30)
    assert received == users
    assert not follower.is_alive()
