"""`public.webhook_messages` and `public.webhook_deliveries`: the intents, outside generations.

A message is an event's body, stored once; a delivery is one (event_id, endpoint_id) pair,
unique, inserted with ON CONFLICT DO NOTHING in the projection's transaction. The dispatcher
claims due deliveries per endpoint with a lease (FOR UPDATE SKIP LOCKED, `next_attempt_at`
pushed past the lease), sends, and writes the outcomes back in one statement per round.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from servicekit.dispatch import expire_intents

NOTIFY_CHANNEL = "integration_svc_deliveries"

DDL = (
    "CREATE TABLE IF NOT EXISTS public.webhook_messages ("
    "event_id uuid PRIMARY KEY, event_type text NOT NULL, body text NOT NULL, "
    "occurred_at timestamptz NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS public.webhook_deliveries ("
    "id bigserial PRIMARY KEY, event_id uuid NOT NULL REFERENCES public.webhook_messages, "
    "endpoint_id text NOT NULL, "
    "status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')), "
    "attempts integer NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now(), "
    "window_start timestamptz NOT NULL DEFAULT now(), "
    "next_attempt_at timestamptz NOT NULL DEFAULT now(), last_attempt_at timestamptz, "
    "delivered_at timestamptz, last_status integer, last_error text, "
    "redeliveries integer NOT NULL DEFAULT 0, UNIQUE (event_id, endpoint_id))",
    "CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON public.webhook_deliveries "
    "(endpoint_id, next_attempt_at) WHERE status = 'pending'",
    # Erasure (integration_svc.erasure): whose event a message is, when its body was purged,
    # and, on the deliveries of `auth.account.deleted`, the person whose queued deliveries
    # to the same endpoint go first.
    "ALTER TABLE public.webhook_messages ADD COLUMN IF NOT EXISTS user_id uuid",
    "ALTER TABLE public.webhook_messages ADD COLUMN IF NOT EXISTS purged_at timestamptz",
    "CREATE INDEX IF NOT EXISTS webhook_messages_user ON public.webhook_messages (user_id)",
    "ALTER TABLE public.webhook_deliveries ADD COLUMN IF NOT EXISTS after_user uuid",
)

PURGED_BODY = ""  # a purged message's body: its delivery is done and cannot be sent again


class PurgedDelivery(Exception):
    """The delivery's body was purged when its person was erased: it cannot be sent again."""

    def __init__(self, delivery: int) -> None:
        super().__init__(
            f"delivery {delivery} cannot be sent again: its body was purged when the person "
            "it was about was erased (auth.account.deleted)"
        )


@dataclass(frozen=True)
class Delivery:
    id: int
    event_id: uuid.UUID
    endpoint_id: str
    attempt: int
    window_start: datetime
    body: bytes


@dataclass(frozen=True)
class Outcome:
    delivery: Delivery
    status: str  # delivered | pending (retry) | failed
    retry_in: float | None
    code: int | None
    error: str | None


async def claim(
    conn: psycopg.AsyncConnection[Any], room: dict[str, int], *, lease: float
) -> list[Delivery]:
    """Reserve due deliveries, at most `room[endpoint]` for each endpoint."""
    if not room:
        return []
    async with conn.transaction():
        cur = await conn.execute(
            "WITH room AS (SELECT * FROM unnest(%s::text[], %s::int[]) AS r(endpoint_id, n)), "
            "due AS (SELECT d.id FROM room CROSS JOIN LATERAL ("
            "  SELECT id FROM public.webhook_deliveries w WHERE w.endpoint_id = room.endpoint_id "
            "  AND w.status = 'pending' AND w.next_attempt_at <= now() "
            "  AND (w.after_user IS NULL OR NOT EXISTS (SELECT 1 FROM public.webhook_deliveries "
            "  p JOIN public.webhook_messages pm USING (event_id) WHERE p.endpoint_id = "
            "  w.endpoint_id AND p.status = 'pending' AND pm.user_id = w.after_user "
            "  AND p.id <> w.id)) "
            "  ORDER BY w.next_attempt_at LIMIT room.n FOR UPDATE SKIP LOCKED) d) "
            "UPDATE public.webhook_deliveries w SET attempts = w.attempts + 1, "
            "last_attempt_at = now(), next_attempt_at = now() + make_interval(secs => %s) "
            "FROM due, public.webhook_messages m WHERE w.id = due.id AND m.event_id = w.event_id "
            "RETURNING w.id, w.event_id, w.endpoint_id, w.attempts, w.window_start, m.body",
            (list(room), list(room.values()), lease),
        )
        rows = await cur.fetchall()
    return [Delivery(r[0], r[1], r[2], r[3], r[4], r[5].encode()) for r in rows]


async def record(conn: psycopg.AsyncConnection[Any], outcomes: Sequence[Outcome]) -> None:
    """Write attempts' outcomes; one whose lease was lost meanwhile (re-claimed) is ignored."""
    if not outcomes:
        return
    await conn.execute(
        "UPDATE public.webhook_deliveries w SET status = r.status, "
        "next_attempt_at = CASE WHEN r.retry_in IS NULL THEN w.next_attempt_at "
        "ELSE now() + make_interval(secs => r.retry_in) END, "
        "delivered_at = CASE WHEN r.status = 'delivered' THEN now() END, "
        "last_status = r.code, last_error = r.error "
        "FROM unnest(%s::bigint[], %s::int[], %s::text[], %s::float8[], %s::int[], %s::text[]) "
        "AS r(id, attempt, status, retry_in, code, error) "
        "WHERE w.id = r.id AND w.attempts = r.attempt AND w.status = 'pending'",
        (
            [o.delivery.id for o in outcomes],
            [o.delivery.attempt for o in outcomes],
            [o.status for o in outcomes],
            [o.retry_in for o in outcomes],
            [o.code for o in outcomes],
            [o.error[:1000] if o.error else None for o in outcomes],
        ),
    )


async def expire(conn: psycopg.AsyncConnection[Any], window: float) -> int:
    """Fail deliveries whose retry window ended while they waited (e.g. breaker open)."""
    return await expire_intents(
        conn,
        "webhook_deliveries",
        window_start="window_start",  # reset by a redelivery
        never="never attempted",
        window=window,
    )


@dataclass(frozen=True)
class LoggedDelivery:
    id: int
    event_id: uuid.UUID
    event_type: str
    endpoint_id: str
    status: str
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    next_attempt_at: datetime


def list_deliveries(
    conn: psycopg.Connection[Any],
    *,
    failed: bool = False,
    endpoint: str | None = None,
    limit: int = 50,
) -> list[LoggedDelivery]:
    rows = conn.execute(
        "SELECT d.id, d.event_id, m.event_type, d.endpoint_id, d.status, d.attempts, "
        "d.last_status, d.last_error, d.created_at, d.delivered_at, d.next_attempt_at "
        "FROM public.webhook_deliveries d JOIN public.webhook_messages m USING (event_id) "
        "WHERE (NOT %s OR d.status = 'failed') AND (%s::text IS NULL OR d.endpoint_id = %s) "
        "ORDER BY d.id DESC LIMIT %s",
        (failed, endpoint, endpoint, limit),
    ).fetchall()
    return [LoggedDelivery(*r) for r in rows]


def redeliver(
    conn: psycopg.Connection[Any],
    *,
    delivery: int | None = None,
    since: datetime | None = None,
    endpoint: str | None = None,
) -> list[int]:
    """Send deliveries again on purpose (same webhook-id), with a fresh retry window.

    A delivery whose body was purged by an erasure is never sent again (PurgedDelivery when
    asked for by id; left out of a --since selection).
    """
    if delivery is not None:
        purged = conn.execute(
            "SELECT 1 FROM public.webhook_deliveries d JOIN public.webhook_messages m "
            "USING (event_id) WHERE d.id = %s AND m.purged_at IS NOT NULL",
            (delivery,),
        ).fetchone()
        if purged:
            raise PurgedDelivery(delivery)
    rows = conn.execute(
        "UPDATE public.webhook_deliveries SET status = 'pending', attempts = 0, "
        "window_start = now(), next_attempt_at = now(), redeliveries = redeliveries + 1, "
        "last_error = NULL, last_status = NULL, delivered_at = NULL "
        "WHERE status <> 'pending' AND (%s::bigint IS NULL OR id = %s) "
        "AND NOT EXISTS (SELECT 1 FROM public.webhook_messages m "
        "WHERE m.event_id = webhook_deliveries.event_id AND m.purged_at IS NOT NULL) "
        "AND (%s::timestamptz IS NULL OR created_at >= %s) "
        "AND (%s::text IS NULL OR endpoint_id = %s) RETURNING id",
        (delivery, delivery, since, since, endpoint, endpoint),
    ).fetchall()
    conn.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
    return sorted(r[0] for r in rows)
