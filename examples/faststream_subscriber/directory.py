"""The subscriber's own read model: a member directory in SQLite, and the ids of the events
already applied, both changed in one transaction.

That transaction is what makes at-least-once delivery safe: a redelivered message (the
subscriber died after the commit, before its ack) or a re-sent one (the relay died after
publishing, before recording its position) carries the same `event_id`, finds it recorded,
and changes nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Literal

from shared_contracts.events import AccountRegistered, ContractEvent, ProfileCreated, ProfileUpdated
from shared_contracts.subscriber import Received

Outcome = Literal["applied", "duplicate"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS applied_events (
    event_id   TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    producer   TEXT NOT NULL,
    position   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    user_id         TEXT PRIMARY KEY,
    email           TEXT,
    display_name    TEXT,
    bio             TEXT,
    locale          TEXT,
    timezone        TEXT,
    avatar_url      TEXT,
    registered_at   TEXT,
    profile_version INTEGER NOT NULL DEFAULT 0,
    profile_changes INTEGER NOT NULL DEFAULT 0
);
"""


class Directory:
    """Members as the events describe them. Sync (sqlite3): call it from a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._transaction() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # One connection per call: sqlite3 connections must not be shared between threads.
        with closing(sqlite3.connect(self.path, timeout=30)) as db, db:
            yield db

    def apply(self, received: Received[ContractEvent]) -> Outcome:
        envelope = received.envelope
        with self._transaction() as db:
            try:
                db.execute(
                    "INSERT INTO applied_events VALUES (?, ?, ?, ?)",
                    (
                        str(envelope.event_id),
                        envelope.event_type,
                        envelope.producer,
                        envelope.position,
                    ),
                )
            except sqlite3.IntegrityError:
                return "duplicate"
            self._change(db, received)
        return "applied"

    def _change(self, db: sqlite3.Connection, received: Received[ContractEvent]) -> None:
        envelope = received.envelope
        match received.event:
            case AccountRegistered(user_id=user_id, email=email, display_name=name):
                db.execute(
                    "INSERT INTO members (user_id, email, display_name, registered_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE"
                    " SET registered_at = excluded.registered_at",
                    (str(user_id), email, name, envelope.occurred_at.isoformat()),
                )
            case ProfileCreated() | ProfileUpdated() as profile:
                # Each profile event carries the whole profile: keep the newest version seen
                # (a redelivery may bring an older one back after a newer one).
                db.execute(
                    "INSERT INTO members (user_id, email, display_name, bio, locale, timezone,"
                    " avatar_url, profile_version, profile_changes)"
                    " VALUES (:user_id, :email, :display_name, :bio, :locale, :timezone,"
                    " :avatar_url, :version, 1)"
                    " ON CONFLICT (user_id) DO UPDATE SET email = excluded.email,"
                    " display_name = excluded.display_name, bio = excluded.bio,"
                    " locale = excluded.locale, timezone = excluded.timezone,"
                    " avatar_url = excluded.avatar_url,"
                    " profile_changes = members.profile_changes + 1,"
                    " profile_version = excluded.profile_version"
                    " WHERE excluded.profile_version > members.profile_version",
                    {
                        **profile.model_dump(mode="json", include=set(ProfileCreated.model_fields)),
                        "version": envelope.aggregate_version,
                    },
                )
            case _:
                pass  # logins, lockouts...: recorded as applied, nothing else to change

    # --- queries (the e2e test reads these) -----------------------------------------------

    def member(self, user_id: str) -> dict[str, object] | None:
        with self._transaction() as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM members WHERE user_id = ?", (user_id,)).fetchone()
        return dict(row) if row else None

    def applied(self) -> list[tuple[str, str]]:
        """(event_id, event_type) of every event applied, once each."""
        with self._transaction() as db:
            return db.execute(
                "SELECT event_id, event_type FROM applied_events ORDER BY producer, position"
            ).fetchall()
