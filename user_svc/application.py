"""The profile service: commands and queries on profiles, and the registration handler.

Sync, like the eventsourcing library: HTTP handlers call it in the threadpool, the RabbitMQ
consumer in its worker thread. Edits of one profile take turns in this process
(`servicekit.aggregates.Combiner`): the edits that queue while a save is in flight are
applied together, in arrival order, and saved at once. Writers in other processes are
resolved by the event store's optimistic concurrency (IntegrityError on a stale version or
an already-created id), retried with jittered backoff; a profile contended past every retry
is a 503 (`Contended`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import Tracking

from servicekit import context
from servicekit.aggregates import Combiner, Gathering, retry_conflicts
from servicekit.eventstore import EventSourcedApplication
from servicekit.messages import Outcome
from shared_contracts.envelope import Envelope
from shared_contracts.events import AccountDeleted, AccountRegistered
from user_svc.domain import InvalidProfileField, Profile, ProfileErased
from user_svc.personal import PERSONAL_DATA
from user_svc.views import ProfileView

log = logging.getLogger("user_svc.application")

PROFILE = "this profile"

# Who was erased here (on `auth.account.deleted`), for `esctl erasure status`: the same shape
# as the projections' `public.erasures` (servicekit.erasure), `swept_at` left to its sweeper.
ERASURES_DDL = (
    "CREATE TABLE IF NOT EXISTS public.erasures (user_id uuid PRIMARY KEY, "
    "erased_at timestamptz NOT NULL DEFAULT now(), swept_at timestamptz)"
)


class StaleProfileVersion(Exception):
    """The client's `If-Match` names a version the profile no longer has."""

    def __init__(self, current: ProfileView) -> None:
        super().__init__(f"the profile is at version {current.version}")
        self.current = current


@dataclass(frozen=True)
class _Edit:
    changes: Mapping[str, str | None]
    expected: frozenset[int] | None
    email: str | None


class ProfileService(EventSourcedApplication):
    name = "users"
    personal_data = PERSONAL_DATA  # sealed per person: erase_person shreds them

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env=env)
        self._edits: Combiner[uuid.UUID, _Edit, ProfileView] = Combiner(
            self._edit_turn, app=self.name
        )
        self._gathered = Gathering(self._edits)

    def get_or_create(self, user_id: uuid.UUID, email: str | None) -> ProfileView:
        """The user's profile, created (empty but for the e-mail) on first use.
        ProfileErased once its account was deleted."""
        profile = self._load(user_id)
        if profile is not None:
            if profile.erased:
                raise ProfileErased
            return ProfileView.of(profile)
        return self.update(user_id, {}, email=email)

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
        is not at an expected version (an edit queued just before it counts: If-Match is
        checked in arrival order). Without a precondition a concurrent write that wins is
        not an error: the changes are applied on top of it.
        """
        return self._edits.submit(user_id, _Edit(changes, _versions(expected_version), email))

    async def update_from_loop(
        self,
        user_id: uuid.UUID,
        changes: Mapping[str, str | None],
        expected_version: int | Collection[int] | None = None,
        *,
        email: str | None = None,
    ) -> ProfileView:
        """`update` for a caller on the event loop (an HTTP handler): the edits of concurrent
        requests on one profile are carried to a worker thread together, one call per turn,
        instead of one waiting thread per request."""
        edit = _Edit(changes, _versions(expected_version), email)
        return await self._gathered.submit(user_id, edit)

    def _edit_turn(
        self, user_id: uuid.UUID, edits: Sequence[_Edit]
    ) -> list[ProfileView | Exception]:
        """One load, every queued edit in order, one save (again if another process won)."""

        def attempt() -> list[ProfileView | Exception]:
            profile = self._load(user_id)
            if profile is None:
                email = next((e.email for e in edits if e.email is not None), None)
                profile = Profile.create(user_id, email=email)
            results: list[ProfileView | Exception] = []
            for edit in edits:
                if edit.expected is not None and profile.version not in edit.expected:
                    results.append(StaleProfileVersion(ProfileView.of(profile)))
                    continue
                try:
                    profile.update(edit.changes)
                except (InvalidProfileField, ProfileErased) as invalid:
                    results.append(invalid)
                    continue
                results.append(ProfileView.of(profile))
            if profile.pending_events:
                self.save(profile)
            return results

        return retry_conflicts(attempt, app=self.name, what=PROFILE)

    def public_profile(self, user_id: uuid.UUID) -> ProfileView | None:
        """None when there is no profile, or when it was erased."""
        profile = self._load(user_id)
        return ProfileView.of(profile) if profile is not None and not profile.erased else None

    def on_account_registered(self, envelope: Envelope) -> Outcome:
        """Create (or complete) the profile of a newly registered account.

        The producer's position is recorded with the new events in one transaction, so a
        redelivered message changes nothing. A registration below the recorded position is
        a redelivery, unless its profile does not exist: then it was dead-lettered and is now
        retried (`esctl dlq retry user_svc`), and it creates the profile without moving the
        position.
        """
        registered = AccountRegistered.model_validate(envelope.data)
        with context.bound(
            correlation_id=envelope.correlation_id, causation_id=str(envelope.event_id)
        ):
            return retry_conflicts(
                lambda: self._apply_registration(registered, envelope.position),
                app=self.name,
                what=PROFILE,
            )

    def _apply_registration(self, registered: AccountRegistered, position: int) -> Outcome:
        producer = AccountRegistered.producer
        late = self.tracked_position(producer) >= position
        profile = self._load(registered.user_id)
        if late and profile is not None:
            return "duplicate"  # a redelivery: the user may have edited it since
        if profile is not None and profile.erased:
            return "duplicate"  # the account was deleted since: nothing comes back
        if profile is None:
            profile = Profile.create(
                registered.user_id,
                email=registered.email,
                display_name=registered.display_name,
            )
        else:  # The user's first GET /users/me came first.
            profile.fill_in_from_registration(registered.email, registered.display_name)
        # IntegrityError: a request saved this profile meanwhile, or a redelivery won.
        if late:
            self.save(profile)
        else:
            self.save_tracked(profile, tracking=Tracking(producer, position))
        return "applied"

    def on_account_deleted(self, envelope: Envelope) -> Outcome:
        """Erase the profile of a deleted account, idempotently under redelivery.

        A stored `Profile.Erased` (no personal data; with the producer's position, in one
        transaction), then the user's key is destroyed (the fields stored before read as
        erased), then the erasure is recorded in `erasures`. Each step is idempotent, and the
        later ones run again on a redelivery, so a crash between them completes next time.
        A user without a profile gets an erased one, so a late registration brings nothing.
        """
        deleted = AccountDeleted.model_validate(envelope.data)
        user_id = deleted.user_id
        with context.bound(
            correlation_id=envelope.correlation_id, causation_id=str(envelope.event_id)
        ):
            outcome = retry_conflicts(
                lambda: self._apply_deletion(user_id, envelope.position),
                app=self.name,
                what=PROFILE,
            )
            if self.personal_keys is not None:
                self.erase_person(user_id)
            else:
                log.warning("no personal data key: the profile's past events stay readable")
                self.evict_person(user_id)
            self._record_erasure(user_id)
        return outcome

    def erased_users(self, user_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
        """Which of `user_ids` are recorded in `erasures`."""
        datastore = getattr(self.recorder, "datastore", None)
        if datastore is None or not user_ids:
            return set()
        with datastore.transaction(commit=False) as cursor:
            cursor.execute(
                "SELECT user_id FROM public.erasures WHERE user_id = ANY(%s::uuid[])",
                (list(user_ids),),
            )
            return {row["user_id"] for row in cursor.fetchall()}

    def _apply_deletion(self, user_id: uuid.UUID, position: int) -> Outcome:
        producer = AccountDeleted.producer
        late = self.tracked_position(producer) >= position
        profile = self._load(user_id) or Profile.create(user_id, email=None)
        if not profile.erase():
            return "duplicate"
        if late:
            self.save(profile)
        else:
            self.save_tracked(profile, tracking=Tracking(producer, position))
        return "applied"

    def _record_erasure(self, user_id: uuid.UUID) -> None:
        datastore = getattr(self.recorder, "datastore", None)
        if datastore is None:  # the library's in-memory store (unit tests)
            return
        with datastore.transaction(commit=True) as cursor:
            cursor.execute(
                "INSERT INTO public.erasures (user_id) VALUES (%s) ON CONFLICT DO NOTHING",
                (user_id,),
            )

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
