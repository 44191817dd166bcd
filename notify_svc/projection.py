"""The notify projection: who to write to (state), and which mails to send (intents).

State lives in the generation (`recipients`), so `esctl replay notify_svc` rebuilds it.
Intents live in `public.mail_intents`, outside every generation, keyed by (event_id, effect)
and inserted with ON CONFLICT DO NOTHING in the same transaction as the position: a
redelivered event is a duplicate before it reaches `apply`, and a replay records none.

`auth.account.deleted` erases the person (servicekit.erasure): their `recipients` row goes,
their pending intents are cancelled and every intent of theirs keeps only its ids, status and
times (context, recipient and error text are cleared), and `public.erasures` records it, all
in the transaction of the position. Nothing personal about an erased person is written again,
by a redelivery, a `dlq retry` or a replay. The maildir copies are removed by the sweeper
(`notify_svc.erasure`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from notify_svc.intents import NOTIFY_CHANNEL, message_id
from servicekit.erasure import deleted_in, erased_among, record_erasures, subject_of
from servicekit.messages import IncomingEvent
from servicekit.projection import Projection, Transaction
from shared_contracts.events import (
    AccountDeleted,
    AccountLocked,
    AccountRegistered,
    EmailVerificationRequested,
    PasswordChanged,
    PasswordReset,
    PasswordResetRequested,
    ProfileCreated,
    ProfileUpdated,
)
from shared_contracts.names import AUTH_EVENTS, USER_EVENTS

WELCOME = "welcome"
PASSWORD_CHANGED = "password_changed"  # noqa: S105 - an effect name
LOCKED = "locked"
VERIFY_EMAIL = "verify_email"
PASSWORD_RESET_LINK = "password_reset_link"  # noqa: S105 - an effect name
PASSWORD_RESET = "password_reset"  # noqa: S105 - an effect name


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


class NotificationProjection(Projection):
    name = "notify_svc"
    bindings = {
        AUTH_EVENTS: [
            AccountRegistered.event_type,
            PasswordChanged.event_type,
            AccountLocked.event_type,
            EmailVerificationRequested.event_type,
            PasswordResetRequested.event_type,
            PasswordReset.event_type,
            AccountDeleted.event_type,
        ],
        USER_EVENTS: [ProfileCreated.event_type, ProfileUpdated.event_type],
    }
    # The account's address and the name given at sign-up come from auth_svc; display name,
    # locale and timezone from the profile once one is known (`profile`), whichever producer's
    # event arrives first.
    # Each source's columns are written only by a newer version of its aggregate (the account,
    # the profile): a retried old event never overwrites what a newer one said.
    tables = {
        "recipients": "user_id uuid PRIMARY KEY, email text, registered_name text, "
        "profile boolean NOT NULL DEFAULT false, display_name text, locale text, timezone text, "
        "account_version bigint, profile_version bigint",
    }
    migrations = (
        "ALTER TABLE {recipients} ADD COLUMN IF NOT EXISTS account_version bigint",
        "ALTER TABLE {recipients} ADD COLUMN IF NOT EXISTS profile_version bigint",
    )
    order_by = {"recipients": "user_id"}

    def __init__(self, mail_domain: str = "eskit.local") -> None:
        self.mail_domain = mail_domain

    async def apply(self, tx: Transaction, events: Sequence[IncomingEvent]) -> None:
        accounts: dict[uuid.UUID, tuple[int, str, str | None]] = {}
        profiles: dict[uuid.UUID, tuple[int, str | None, str | None, str | None, str | None]] = {}
        intents: list[tuple[uuid.UUID, str, uuid.UUID, str, dict[str, Any]]] = []
        deleted = deleted_in(events)
        erased = deleted | await erased_among(tx, (subject_of(e) for e in events))
        for item in events:
            event, env = item.event, item.envelope
            if subject_of(item) in erased:
                continue  # nothing personal about an erased person is written again
            context: dict[str, Any]
            match event:
                case AccountRegistered():
                    if env.aggregate_version > accounts.get(event.user_id, (0,))[0]:
                        accounts[event.user_id] = (
                            env.aggregate_version,
                            event.email,
                            event.display_name,
                        )
                    context = {"email": event.email, "display_name": event.display_name}
                    if event.verification_link_sealed:
                        # Still sealed: opened only when the mail is rendered.
                        context["link_sealed"] = event.verification_link_sealed
                        context["expires_at"] = _iso(event.verification_expires_at)
                    intents.append((env.event_id, WELCOME, event.user_id, env.event_type, context))
                case EmailVerificationRequested() | PasswordResetRequested():
                    if event.link_sealed:
                        effect = (
                            VERIFY_EMAIL
                            if isinstance(event, EmailVerificationRequested)
                            else PASSWORD_RESET_LINK
                        )
                        context = {
                            "link_sealed": event.link_sealed,
                            "expires_at": event.expires_at.isoformat(),
                        }
                        intents.append(
                            (env.event_id, effect, event.user_id, env.event_type, context)
                        )
                case PasswordReset():
                    context = {"occurred_at": env.occurred_at.isoformat()}
                    intents.append(
                        (env.event_id, PASSWORD_RESET, event.user_id, env.event_type, context)
                    )
                case PasswordChanged():
                    context = {"occurred_at": env.occurred_at.isoformat()}
                    intents.append(
                        (env.event_id, PASSWORD_CHANGED, event.user_id, env.event_type, context)
                    )
                case AccountLocked():
                    context = {
                        "locked_until": event.locked_until.isoformat(),
                        "failed_attempts": event.failed_attempts,
                    }
                    intents.append((env.event_id, LOCKED, event.user_id, env.event_type, context))
                case ProfileCreated() | ProfileUpdated():
                    if env.aggregate_version > profiles.get(event.user_id, (0,))[0]:
                        profiles[event.user_id] = (
                            env.aggregate_version,
                            event.display_name,
                            event.locale,
                            event.timezone,
                            event.email,
                        )
        await tx.executemany(
            "INSERT INTO {recipients} AS t (user_id, account_version, email, registered_name) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (user_id) DO UPDATE SET "
            "account_version = excluded.account_version, email = excluded.email, "
            "registered_name = excluded.registered_name "
            "WHERE coalesce(t.account_version, 0) < excluded.account_version",
            [(user, *fields) for user, fields in accounts.items()],
        )
        await tx.executemany(
            "INSERT INTO {recipients} AS t (user_id, profile, profile_version, display_name, "
            "locale, timezone, email) VALUES (%s, true, %s, %s, %s, %s, %s) "
            "ON CONFLICT (user_id) DO UPDATE SET profile = true, "
            "profile_version = excluded.profile_version, display_name = excluded.display_name, "
            "locale = excluded.locale, timezone = excluded.timezone, "
            "email = coalesce(t.email, excluded.email) "
            "WHERE coalesce(t.profile_version, 0) < excluded.profile_version",
            [(user, *fields) for user, fields in profiles.items()],
        )
        if deleted:
            await self.erase(tx, deleted)
        if tx.replaying or not intents:
            return  # a rebuild restores state; it never sends anything
        await tx.cursor.execute(
            "INSERT INTO public.mail_intents (event_id, effect, user_id, event_type, context, "
            "message_id) SELECT * FROM unnest(%s::uuid[], %s::text[], %s::uuid[], %s::text[], "
            "%s::jsonb[], %s::text[]) ON CONFLICT (event_id, effect) DO NOTHING",
            (
                [i[0] for i in intents],
                [i[1] for i in intents],
                [i[2] for i in intents],
                [i[3] for i in intents],
                [json.dumps(i[4]) for i in intents],
                [message_id(i[0], i[1], self.mail_domain) for i in intents],
            ),
        )
        await tx.cursor.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))

    async def erase(self, tx: Transaction, users: set[uuid.UUID]) -> None:
        """Erase `users` here, in the batch's transaction (idempotent: a replay does it again)."""
        ordered = sorted(users)
        await tx.execute("DELETE FROM {recipients} WHERE user_id = ANY(%s::uuid[])", (ordered,))
        await tx.cursor.execute(
            "UPDATE public.mail_intents SET context = '{}'::jsonb, recipient = NULL, "
            "last_error = CASE WHEN status = 'pending' THEN 'cancelled: account deleted' "
            "WHEN last_error LIKE 'cancelled: %%' THEN last_error "
            "WHEN status = 'failed' THEN 'account deleted' END, "
            "status = CASE WHEN status = 'pending' THEN 'failed' ELSE status END "
            "WHERE user_id = ANY(%s::uuid[])",
            (ordered,),
        )
        await record_erasures(tx, users)
