"""The reporting read models, fed only by public events.

- `signups`: accounts registered per day;
- `logins`: successful and failed logins per day;
- `locks`: lockouts per day and account;
- `activity`: who was active each day (registered, logged in, changed their password or
  their profile), for daily active users;
- `profiles`: which optional fields each profile has set, for profile completeness.

Days are UTC days of the event's `occurred_at`. A batch is folded in memory first and written
with one statement per table.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import date

from servicekit.messages import IncomingEvent
from servicekit.projection import Projection, Transaction
from shared_contracts.events import (
    PROFILE_FIELDS,
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

    async def apply(self, tx: Transaction, events: Sequence[IncomingEvent]) -> None:
        signups: Counter[date] = Counter()
        logins: dict[date, list[int]] = {}
        locks: Counter[tuple[date, uuid.UUID]] = Counter()
        active: set[tuple[date, uuid.UUID]] = set()
        profiles: dict[uuid.UUID, tuple[date, int, ProfileFields]] = {}
        for item in events:
            day = item.envelope.occurred_at.date()
            event = item.event
            match event:
                case AccountRegistered():
                    signups[day] += 1
                    active.add((day, event.user_id))
                case LoginSucceeded():
                    logins.setdefault(day, [0, 0])[0] += 1
                    active.add((day, event.user_id))
                case LoginFailed():
                    logins.setdefault(day, [0, 0])[1] += 1
                case AccountLocked():
                    locks[(day, event.user_id)] += 1
                case PasswordChanged():
                    active.add((day, event.user_id))
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
