"""integration_svc's part of an erasure beyond the consumer's transaction: the stored bodies.

A webhook message keeps the event's data (e-mail, names) for as long as it may be sent. Once
none of the erased person's deliveries is pending (the ones queued before the deletion, and
the deletion's own, which waits for them), the sweeper replaces the bodies of their messages
with an empty one and stamps `purged_at`, and clears their deliveries' last error (an
endpoint's answer may echo the body). Ids, statuses, attempts and times stay, so the delivery
log still reads; `esctl webhooks redeliver` refuses a purged delivery. The deletion's own
message carries only the user id, and stays.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime
from typing import Any

import psycopg

from integration_svc.deliveries import PURGED_BODY
from shared_contracts.events import AccountDeleted


async def purge_bodies(
    conn: psycopg.AsyncConnection[Any], erasures: dict[uuid.UUID, datetime]
) -> Collection[uuid.UUID]:
    """The sweeper's hook (servicekit.erasure.SweepHook): purge whom nothing waits for."""
    rows = await (
        await conn.execute(
            "SELECT u FROM unnest(%s::uuid[]) AS u WHERE NOT EXISTS (SELECT 1 FROM "
            "public.webhook_deliveries d JOIN public.webhook_messages m USING (event_id) "
            "WHERE m.user_id = u AND d.status = 'pending')",
            (list(erasures),),
        )
    ).fetchall()
    ready = [r[0] for r in rows]
    if not ready:
        return []
    texts = [str(u) for u in ready]
    # Messages stored before `user_id` was: found by their body.
    about = (
        "(m.user_id = ANY(%s::uuid[]) OR (m.user_id IS NULL AND m.body <> '' "
        "AND (m.body::jsonb #>> '{data,user_id}') = ANY(%s::text[]))) "
        "AND m.event_type <> %s AND m.purged_at IS NULL"
    )
    params = (ready, texts, AccountDeleted.event_type)
    clear = "UPDATE public.webhook_deliveries d SET last_error = NULL "
    clear += "FROM public.webhook_messages m WHERE m.event_id = d.event_id AND " + about
    await conn.execute(clear, params)
    await conn.execute(
        "UPDATE public.webhook_messages m SET body = %s, purged_at = now() "  # noqa: S608
        "WHERE " + about,
        (PURGED_BODY, *params),
    )
    return ready
