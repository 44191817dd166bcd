"""The reporting read models, fed only by public events.

- `signups`: accounts registered per day;
- `logins`: successful and failed logins per day;
- `locks`: lockouts per day and account;
- `activity`: who was active each day (registered, logged in, changed their password or
  their profile), for daily active users;
- `profiles`: which optional fields each profile has set, for profile completeness.

Days are UTC days of the event's `occurred_at`. A batch is folded in memory first and written
with one statement per table.

Only anonymous counts outlive a person: on `auth.account.deleted` their `profiles` row goes
(the profile no longer exists) and their rows of `locks` and `activity` are re-keyed to an
anonymous id, so every day's counts stay as they were; `public.erasures` records it in the
same transaction (servicekit.erasure). Events about an erased person (a replay, a redelivery)
still count in the day totals, under an anonymous id, and never in `profiles`. The anonymous
id is `uuid5(salt, user_id)` with a random salt per process that is never stored, so nothing
can link it back; the cost: a replay in another process keys an erased person's rows
differently, so `esctl replay --dry-run` lists those rows as differences.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import date

from servicekit.erasure import deleted_in, erased_among, record_erasures, subject_of
from servicekit.messages import IncomingEvent
from servicekit.projection import Projection, Transaction
from shared_contracts.events import (
    PROFILE_FIELDS,
    AccountDeleted,
    AccountLocked,
    AccountRegistered,
    LoginFailed,
    LoginSucceeded,
    PasswordChanged,
    ProfileCreated,
    ProfileFields,
    ProfileUpdated,
)
from shared_contracts.names import AUTH_EVENTS, USER_EVENTS

# The optional profile fields whose completeness is reported.


class ReportingProjection(Projection):
    name = "reporting_svc"
    bindings = {
        AUTH_EVENTS: [
            AccountRegistered.event_type,
            LoginSucceeded.event_type,
            LoginFailed.event_type,
            AccountLocked.event_type,
            PasswordChanged.event_type,
            AccountDeleted.event_type,
        ],
        USER_EVENTS: [ProfileCreated.event_type, ProfileUpdated.event_type],
    }
    tables = {
        "signups": "day date PRIMARY KEY, accounts bigint NOT NULL",
        "logins": "day date PRIMARY KEY, succeeded bigint NOT NULL, failed bigint NOT NULL",
        "locks": "day date NOT NULL, user_id uuid NOT NULL, locks integer NOT NULL, "
        "PRIMARY KEY (day, user_id)",
        "activity": "day date NOT NULL, user_id uuid NOT NULL, PRIMARY KEY (day, user_id)",
        "profiles": "user_id uuid PRIMARY KEY, created_on date NOT NULL, "
        + ", ".join(f"{f} boolean NOT NULL" for f in PROFILE_FIELDS)
        + ", version bigint NOT NULL DEFAULT 0",
    }
    # Generations made before profiles kept their version: 0, so any event is newer.
    migrations = (
        "ALTER TABLE {profiles} ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0",
    )
    order_by = {
        "signups": "day",
        "logins": "day",
        "locks": "day, user_id",
        "activity": "day, user_id",
        "profiles": "user_id",
    }

    def __init__(self) -> None:
        self.salt = uuid.uuid4()  # never stored: see the module's docstring

    def anonymous(self, user: uuid.UUID | None) -> uuid.UUID | None:
        return None if user is None else uuid.uuid5(self.salt, str(user))

    async def apply(self, tx: Transaction, events: Sequence[IncomingEvent]) -> None:
        signups: Counter[date] = Counter()
        logins: dict[date, list[int]] = {}
        locks: Counter[tuple[date, uuid.UUID]] = Counter()
        active: set[tuple[date, uuid.UUID]] = set()
        profiles: dict[uuid.UUID, tuple[date, int, ProfileFields]] = {}
        deleted = deleted_in(events)
        erased = deleted | await erased_among(tx, (subject_of(e) for e in events))
        for item in events:
            day = item.envelope.occurred_at.date()
            event = item.event
            user = subject_of(item)
            who = self.anonymous(user) if user in erased else user
            match event:
                case AccountRegistered():
                    signups[day] += 1
                    active.add((day, who or event.user_id))
                case LoginSucceeded():
                    logins.setdefault(day, [0, 0])[0] += 1
                    active.add((day, who or event.user_id))
                case LoginFailed():
                    logins.setdefault(day, [0, 0])[1] += 1
                case AccountLocked():
                    locks[(day, who or event.user_id)] += 1
                case PasswordChanged():
                    active.add((day, who or event.user_id))
                case ProfileCreated() | ProfileUpdated() if user in erased:
                    if isinstance(event, ProfileUpdated):
                        active.add((day, who or event.user_id))
                case ProfileCreated() | ProfileUpdated():
                    # Each event carries the whole profile: the newest version wins, here and
                    # in the table (a retried old event may arrive after newer ones).
                    version = item.envelope.aggregate_version
                    first, newest, fields = profiles.get(event.user_id, (day, 0, event))
                    if version > newest:
                        newest, fields = version, event
                    profiles[event.user_id] = (min(first, day), newest, fields)
                    if isinstance(event, ProfileUpdated):
                        active.add((day, event.user_id))
        await tx.executemany(
            "INSERT INTO {signups} AS t (day, accounts) VALUES (%s, %s) "
            "ON CONFLICT (day) DO UPDATE SET accounts = t.accounts + excluded.accounts",
            sorted(signups.items()),
        )
        await tx.executemany(
            "INSERT INTO {logins} AS t (day, succeeded, failed) VALUES (%s, %s, %s) "
            "ON CONFLICT (day) DO UPDATE SET succeeded = t.succeeded + excluded.succeeded, "
            "failed = t.failed + excluded.failed",
            sorted((day, ok, bad) for day, (ok, bad) in logins.items()),
        )
        await tx.executemany(
            "INSERT INTO {locks} AS t (day, user_id, locks) VALUES (%s, %s, %s) "
            "ON CONFLICT (day, user_id) DO UPDATE SET locks = t.locks + excluded.locks",
            sorted((day, user, n) for (day, user), n in locks.items()),
        )
        await tx.executemany(
            "INSERT INTO {activity} (day, user_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            sorted(active),
        )
        columns = ", ".join(PROFILE_FIELDS)
        newer = "excluded.version > t.version"
        await tx.executemany(
            f"INSERT INTO {{profiles}} AS t (user_id, created_on, version, {columns}) "  # noqa: S608
            f"VALUES (%s, %s, %s, {', '.join(['%s'] * len(PROFILE_FIELDS))}) "
            "ON CONFLICT (user_id) DO UPDATE SET "
            "created_on = least(t.created_on, excluded.created_on), "
            "version = greatest(t.version, excluded.version), "
            + ", ".join(
                f"{f} = CASE WHEN {newer} THEN excluded.{f} ELSE t.{f} END" for f in PROFILE_FIELDS
            ),
            sorted(
                (user, created, version, *(bool(getattr(event, f)) for f in PROFILE_FIELDS))
                for user, (created, version, event) in profiles.items()
            ),
        )
        if deleted:
            await self.erase(tx, deleted)

    async def erase(self, tx: Transaction, users: set[uuid.UUID]) -> None:
        """Leave only anonymous counts of `users`, in the batch's transaction (idempotent)."""
        pairs = sorted((user, self.anonymous(user)) for user in users)
        keys = ([p[0] for p in pairs], [p[1] for p in pairs])
        await tx.execute("DELETE FROM {profiles} WHERE user_id = ANY(%s::uuid[])", (keys[0],))
        await tx.execute(
            "INSERT INTO {activity} (day, user_id) SELECT a.day, k.anon FROM {activity} a "
            "JOIN unnest(%s::uuid[], %s::uuid[]) AS k(user_id, anon) USING (user_id) "
            "ON CONFLICT DO NOTHING",
            keys,
        )
        await tx.execute("DELETE FROM {activity} WHERE user_id = ANY(%s::uuid[])", (keys[0],))
        await tx.execute(
            "INSERT INTO {locks} AS t (day, user_id, locks) SELECT l.day, k.anon, l.locks "
            "FROM {locks} l JOIN unnest(%s::uuid[], %s::uuid[]) AS k(user_id, anon) "
            "USING (user_id) ON CONFLICT (day, user_id) DO UPDATE SET locks = t.locks + "
            "excluded.locks",
            keys,
        )
        await tx.execute("DELETE FROM {locks} WHERE user_id = ANY(%s::uuid[])", (keys[0],))
        await record_erasures(tx, users)
