"""The profile service: commands and queries on profiles, and the registration handler.

Sync, like the eventsourcing library: HTTP handlers call it in the threadpool, the RabbitMQ
consumer in its worker thread. Concurrent writers are resolved by the event store's
optimistic concurrency (IntegrityError on a stale version or an already-created id).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Mapping

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError, Tracking

from servicekit import context
from servicekit.eventstore import EventSourcedApplication
from servicekit.messages import Outcome
from shared_contracts.envelope import Envelope
from shared_contracts.events import AccountRegistered
from user_svc.domain import Profile
from user_svc.views import ProfileView

log = logging.getLogger("user_svc.application")

# Each attempt loses only when another writer saved this very profile in between.
MAX_ATTEMPTS = 20


class StaleProfileVersion(Exception):
    """The client's `If-Match` names a version the profile no longer has."""

    def __init__(self, current: ProfileView) -> None:
        super().__init__(f"the profile is at version {current.version}")
        self.current = current


class ProfileService(EventSourcedApplication):
    name = "users"

    def get_or_create(self, user_id: uuid.UUID, email: str | None) -> ProfileView:
        """The user's profile, created (empty but for the e-mail) on first use."""
        for _ in range(MAX_ATTEMPTS):
            profile = self._load(user_id)
            if profile is not None:
                return ProfileView.of(profile)
            profile = Profile.create(user_id, email=email)
            try:
                self.save(profile)
            except IntegrityError:
                continue  # Created meanwhile by the registration event or another request.
            return ProfileView.of(profile)
        raise _contention(user_id)

    def update(
        self,
        user_id: uuid.UUID,
        changes: Mapping[str, str | None],
        expected_version: int | Collection[int] | None = None,
        *,
        email: str | None = None,
    ) -> ProfileView:
        """Apply changes; `expected_version` (from If-Match) makes it conditional.

        Raises InvalidProfileField on a bad value and StaleProfileVersion when the profile
        is not at an expected version. Without a precondition a concurrent write that wins
        is not an error: the changes are applied again on top of it.
        """
        expected = _versions(expected_version)
        for _ in range(MAX_ATTEMPTS):
            profile = self._load(user_id) or Profile.create(user_id, email=email)
            if expected is not None and profile.version not in expected:
                raise StaleProfileVersion(ProfileView.of(profile))
            profile.update(changes)
            if profile.pending_events:
                try:
                    self.save(profile)
                except IntegrityError:
                    continue
            return ProfileView.of(profile)
        raise _contention(user_id)

    def public_profile(self, user_id: uuid.UUID) -> ProfileView | None:
        profile = self._load(user_id)
        return ProfileView.of(profile) if profile is not None else None

    def on_account_registered(self, envelope: Envelope) -> Outcome:
        """Create (or complete) the profile of a newly registered account.

        The producer's position is recorded with the new events in one transaction, so a
        redelivered message changes nothing. A registration below the recorded position is
        a redelivery, unless its profile does not exist: then it was dead-lettered and is now
        retried (`esctl dlq retry user_svc`), and it creates the profile without moving the
        position.
        """
        registered = AccountRegistered.model_validate(envelope.data)
        producer = AccountRegistered.producer
        with context.bound(
            correlation_id=envelope.correlation_id, causation_id=str(envelope.event_id)
        ):
            for _ in range(MAX_ATTEMPTS):
                late = self.tracked_position(producer) >= envelope.position
                profile = self._load(registered.user_id)
                if late and profile is not None:
                    return "duplicate"  # a redelivery: the user may have edited it since
                if profile is None:
                    profile = Profile.create(
                        registered.user_id,
                        email=registered.email,
                        display_name=registered.display_name,
                    )
                else:  # The user's first GET /users/me came first.
                    profile.fill_in_from_registration(registered.email, registered.display_name)
                try:
                    if late:
                        self.save(profile)
                    else:
                        self.save_tracked(profile, tracking=Tracking(producer, envelope.position))
                except IntegrityError:
                    continue  # A request saved this profile meanwhile, or a redelivery won.
                return "applied"
        raise _contention(registered.user_id)

    def _load(self, user_id: uuid.UUID) -> Profile | None:
        try:
            profile: Profile = self.repository.get(user_id)
        except AggregateNotFoundError:
            return None
        return profile


def _versions(expected: int | Collection[int] | None) -> frozenset[int] | None:
    if expected is None:
        return None
    if isinstance(expected, int):
        return frozenset((expected,))
    return frozenset(expected)


def _contention(user_id: uuid.UUID) -> RuntimeError:
    log.error("gave up writing profile %s after %d conflicts", user_id, MAX_ATTEMPTS)
    return RuntimeError(f"too many concurrent writes to profile {user_id}")
