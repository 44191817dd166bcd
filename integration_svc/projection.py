"""The integration projection: one delivery intent per (event, subscribed endpoint).

It keeps no read model of its own (the generation holds only positions), so a replay
rebuilds nothing and, as `tx.replaying` says, records nothing: it never sends again.
Deliveries live in `public`, outside every generation, and are inserted with
ON CONFLICT DO NOTHING in the same transaction as the position.

`auth.account.deleted` is delivered like any event, but to each endpoint only after that
person's deliveries still queued for it (`after_user`); `public.erasures` records the
erasure in the same transaction, and nothing more about the person is recorded for any
endpoint. Once none of their deliveries is pending, the sweeper purges the stored bodies of
their messages (integration_svc.erasure).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

from integration_svc.deliveries import NOTIFY_CHANNEL
from servicekit.erasure import deleted_in, erased_among, record_erasures, subject_of
from servicekit.messages import IncomingEvent
from servicekit.projection import Projection, Transaction, topic_matches
from shared_contracts.envelope import Envelope
from shared_contracts.events import AccountDeleted, without_sealed
from shared_contracts.names import AUTH_EVENTS, USER_EVENTS


def body(envelope: Envelope) -> str:
    """The webhook payload: Standard Webhooks' `type`, `timestamp`, `data`, and provenance."""
    return json.dumps(
        {
            "type": envelope.event_type,
            "timestamp": envelope.occurred_at.isoformat().replace("+00:00", "Z"),
            # Sealed links are for notify_svc only: they never leave the bus.
            "data": without_sealed(envelope.event_type, envelope.schema_version, envelope.data),
            "event_id": str(envelope.event_id),
            "schema_version": envelope.schema_version,
            "producer": envelope.producer,
            "aggregate_id": str(envelope.aggregate_id),
            "aggregate_version": envelope.aggregate_version,
        },
        separators=(",", ":"),
        default=str,
    )


class WebhookProjection(Projection):
    name = "integration_svc"
    bindings = {AUTH_EVENTS: ["#"], USER_EVENTS: ["#"]}  # what it can handle
    # What its queue is bound to at declare time; the endpoints' patterns are bound by
    # integration_svc.bindings.
    queue_bindings = {AUTH_EVENTS: [AccountDeleted.event_type]}
    tables: dict[str, str] = {}

    async def apply(self, tx: Transaction, events: Sequence[IncomingEvent]) -> None:
        deleted = deleted_in(events)
        if tx.replaying:
            await record_erasures(tx, deleted)
            return
        gone = await erased_among(tx, (subject_of(e) for e in events))
        await tx.cursor.execute("SELECT id, events FROM public.webhook_endpoints")
        endpoints = [(str(r[0]), list(r[1])) for r in await tx.cursor.fetchall()]
        messages: list[tuple[Envelope, uuid.UUID | None]] = []
        pairs: list[tuple[str, str, uuid.UUID | None]] = []
        for item in events:
            env, user = item.envelope, subject_of(item)
            if user in gone:
                continue  # erased before: nothing more about them leaves
            after = None
            if isinstance(item.event, AccountDeleted):
                gone.add(item.event.user_id)
                after = item.event.user_id  # after their deliveries still queued
            subscribed = [
                eid
                for eid, patterns in endpoints
                if any(topic_matches(p, env.event_type) for p in patterns)
            ]
            if subscribed:
                messages.append((env, user))
                pairs += [(str(env.event_id), eid, after) for eid in subscribed]
        await record_erasures(tx, deleted)
        if not pairs:
            return
        await tx.cursor.execute(
            "INSERT INTO public.webhook_messages (event_id, event_type, body, occurred_at, "
            "user_id) SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], "
            "%s::timestamptz[], %s::uuid[]) ON CONFLICT (event_id) DO NOTHING",
            (
                [e.event_id for e, _ in messages],
                [e.event_type for e, _ in messages],
                [body(e) for e, _ in messages],
                [e.occurred_at for e, _ in messages],
                [user for _, user in messages],
            ),
        )
        await tx.cursor.execute(
            "INSERT INTO public.webhook_deliveries (event_id, endpoint_id, after_user) "
            "SELECT * FROM unnest(%s::uuid[], %s::text[], %s::uuid[]) "
            "ON CONFLICT (event_id, endpoint_id) DO NOTHING",
            ([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]),
        )
        await tx.cursor.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
