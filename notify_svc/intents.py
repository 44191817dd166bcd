"""`public.mail_intents`: one row per mail to send, outside the projection's generations.

A row is keyed by (event_id, effect). The dispatcher claims due rows with a lease (FOR UPDATE
SKIP LOCKED, then `next_attempt_at` pushed past the lease), sends, and marks them sent or
schedules the next attempt. A crash between sending and marking resends once, after the
lease, with the same Message-ID, so a receiving system can drop the duplicate.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from servicekit.dispatch import expire_intents
from servicekit.projection import live_generation

NOTIFY_CHANNEL = "notify_svc_mail_intents"
MESSAGE_ID_NAMESPACE = uuid.UUID("8f3c1e52-3c1b-4d57-9a55-6e0f9b7a2d10")

DDL = (
    "CREATE TABLE IF NOT EXISTS public.mail_intents ("
    "event_id uuid NOT NULL, effect text NOT NULL, user_id uuid NOT NULL, "
    "event_type text NOT NULL, context jsonb NOT NULL, message_id text NOT NULL, "
    "status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')), "
    "attempts integer NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now(), "
    "next_attempt_at timestamptz NOT NULL DEFAULT now(), sent_at timestamptz, "
    "recipient text, last_error text, PRIMARY KEY (event_id, effect))",
    "CREATE INDEX IF NOT EXISTS mail_intents_due ON public.mail_intents (next_attempt_at) "
    "WHERE status = 'pending'",
)


def message_id(event_id: uuid.UUID, effect: str, domain: str) -> str:
    """The same Message-ID on every attempt of one effect of one event."""
    return f"<{uuid.uuid5(MESSAGE_ID_NAMESPACE, f'{event_id}/{effect}')}@{domain}>"


@dataclass(frozen=True)
class Intent:
    event_id: uuid.UUID
    effect: str
    user_id: uuid.UUID
    context: dict[str, Any]
    message_id: str
    attempts: int
    created_at: datetime
    email: str | None
    name: str | None
    locale: str | None
    timezone: str | None


async def claim(
    conn: psycopg.AsyncConnection[Any], projection: str, *, limit: int, lease: float
) -> list[Intent]:
    """Reserve up to `limit` due intents with what the live generation knows of each user."""
    async with conn.transaction():
        live = await live_generation(conn, projection)
        if live is None:
            return []
        recipients = sql.Identifier(live, "recipients")
        rows = await (
            await conn.execute(
                "WITH due AS (SELECT event_id, effect FROM public.mail_intents "
                "WHERE status = 'pending' AND next_attempt_at <= now() "
                "ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED) "
                "UPDATE public.mail_intents i SET attempts = i.attempts + 1, "
                "next_attempt_at = now() + make_interval(secs => %s) FROM due "
                "WHERE i.event_id = due.event_id AND i.effect = due.effect "
                "RETURNING i.event_id, i.effect, i.user_id, i.context, i.message_id, "
                "i.attempts, i.created_at",
                (limit, lease),
            )
        ).fetchall()
        if not rows:
            return []
        known = {
            r[0]: r[1:]
            for r in await (
                await conn.execute(
                    sql.SQL(
                        "SELECT user_id, email, CASE WHEN profile THEN display_name "
                        "ELSE registered_name END, locale, timezone FROM {} "
                        "WHERE user_id = ANY(%s)"
                    ).format(recipients),
                    ([r[2] for r in rows],),
                )
            ).fetchall()
        }
    intents = []
    for event_id, effect, user_id, context, mid, attempts, created_at in rows:
        email, name, locale, tz = known.get(user_id, (None, None, None, None))
        intents.append(
            Intent(
                event_id=event_id,
                effect=effect,
                user_id=user_id,
                context=context,
                message_id=mid,
                attempts=attempts,
                created_at=created_at,
                email=email or context.get("email"),
                name=name or context.get("display_name"),
                locale=locale,
                timezone=tz,
            )
        )
    return intents


# A mail in flight when its person was erased: the erasure cancelled it and cleared the row,
# and what the send reports (the address, an error quoting it) is not written back: every
# update below ends with "AND NOT EXISTS (... public.erasures ...)".


async def mark_sent(conn: psycopg.AsyncConnection[Any], intent: Intent, recipient: str) -> None:
    await conn.execute(
        "UPDATE public.mail_intents SET status = 'sent', sent_at = now(), recipient = %s, "
        "last_error = NULL WHERE event_id = %s AND effect = %s "
        "AND NOT EXISTS (SELECT 1 FROM public.erasures e WHERE e.user_id = %s)",
        (recipient, intent.event_id, intent.effect, intent.user_id),
    )


async def mark_failed_attempt(
    conn: psycopg.AsyncConnection[Any],
    intent: Intent,
    error: str,
    *,
    retry_in: float | None,
) -> None:
    """Schedule the next attempt in `retry_in` seconds, or fail the intent for good (None)."""
    if retry_in is None:
        await conn.execute(
            "UPDATE public.mail_intents SET status = 'failed', last_error = %s "
            "WHERE event_id = %s AND effect = %s "
            "AND NOT EXISTS (SELECT 1 FROM public.erasures e WHERE e.user_id = %s)",
            (error[:1000], intent.event_id, intent.effect, intent.user_id),
        )
        return
    await conn.execute(
        "UPDATE public.mail_intents SET last_error = %s, "
        "next_attempt_at = now() + make_interval(secs => %s) WHERE event_id = %s AND effect = %s "
        "AND NOT EXISTS (SELECT 1 FROM public.erasures e WHERE e.user_id = %s)",
        (error[:1000], retry_in, intent.event_id, intent.effect, intent.user_id),
    )


async def expire(conn: psycopg.AsyncConnection[Any], window: float) -> int:
    """Fail intents whose retry window has ended while they waited (e.g. breaker open)."""
    return await expire_intents(
        conn, "mail_intents", window_start="created_at", never="never sent", window=window
    )
