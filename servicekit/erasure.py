"""Erasing a person from a projection: what every consuming service does on
`auth.account.deleted`, and what it keeps so that nothing brings the person back.

- `public.erasures(user_id, erased_at, swept_at)`, outside every generation, so it survives
  `esctl replay` (a swap drops the old generation, never `public`). A row is written in the
  transaction that applies the deletion, with the projection's position. Before writing
  anything personal, a projection asks `erased_among` about the batch's users: an old
  `auth.account.registered` replayed after the deletion (or a redelivery, or a `dlq retry`)
  is then left out, even when retention has dropped the deletion from `events.history`.
- `forget_parked`: the person's parked events are deleted in that same transaction. For an
  event at or below its producer's position, "not parked" means "applied", so a later
  `esctl dlq retry` of one of them is a duplicate and brings nothing back.
- `ErasureSweeper`, beside the consumer in the same process: what a database transaction
  cannot cover. For each erasure not yet swept, the service's own hook first (notify_svc:
  the maildir copies; integration_svc: the stored webhook bodies, once the person's queued
  deliveries are done), then the person's messages in `<service>.dlq` are dropped, then
  `swept_at` is set. `esctl erasure status` says "done" only then.

The dead-letter queue is swept by fetching every message unacked, acking (dropping) those
about an erased person, and closing the channel: the broker puts the others back in their
order, which is what `esctl dlq list` does too. A message is about a person when its
envelope's `data.user_id` or `aggregate_id` is theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from datetime import datetime
from typing import Any

import aio_pika
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from servicekit import amqp
from servicekit.eventstore import connection_kwargs
from servicekit.messages import TRANSIENT_ERRORS, IncomingEvent
from servicekit.projection import ERASURES_DDL, Transaction
from servicekit.supervise import sleep_unless_stopped
from shared_contracts.events import AccountDeleted
from shared_contracts.names import dead_letter_queue

log = logging.getLogger("servicekit.erasure")

__all__ = ["ERASURES_DDL", "ErasureSweeper", "erased_among", "record_erasures"]

# What a sweep waits out: a lost database or broker, a pool that cannot connect yet.
SWEEP_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, psycopg.Error, PoolTimeout)

# Sweeping: a hook gets the erasures not yet swept (user id -> erased_at) and returns the
# users whose local clean-up is complete; only those are swept from the DLQ and marked.
SweepHook = Callable[
    [psycopg.AsyncConnection[Any], dict[uuid.UUID, datetime]], Awaitable[Collection[uuid.UUID]]
]


def subject_of(event: IncomingEvent) -> uuid.UUID | None:
    """The person an event is about: its `user_id` (every public event here has one)."""
    user = getattr(event.event, "user_id", None)
    return user if isinstance(user, uuid.UUID) else None


def deleted_in(events: Iterable[IncomingEvent]) -> set[uuid.UUID]:
    """The people an `auth.account.deleted` in `events` erases."""
    return {e.event.user_id for e in events if isinstance(e.event, AccountDeleted)}


async def erased_among(tx: Transaction, users: Iterable[uuid.UUID | None]) -> set[uuid.UUID]:
    """Which of `users` have been erased before (in this database, whatever the generation)."""
    wanted = sorted({u for u in users if u is not None})
    if not wanted:
        return set()
    await tx.cursor.execute(
        "SELECT user_id FROM public.erasures WHERE user_id = ANY(%s::uuid[])", (wanted,)
    )
    return {row[0] for row in await tx.cursor.fetchall()}


async def record_erasures(tx: Transaction, users: Collection[uuid.UUID]) -> None:
    """Record that `users` are erased here (the first time counts) and forget their parked
    events, in the caller's transaction."""
    if not users:
        return
    ordered = sorted(users)
    await tx.cursor.execute(
        "INSERT INTO public.erasures (user_id) SELECT * FROM unnest(%s::uuid[]) "
        "ON CONFLICT (user_id) DO NOTHING",
        (ordered,),
    )
    await forget_parked(tx, ordered)


async def forget_parked(tx: Transaction, users: Sequence[uuid.UUID]) -> None:
    """Delete the parked events about `users` from this generation (they count as decided)."""
    await tx.execute(
        "DELETE FROM {_parked} WHERE envelope IS NOT NULL AND ("
        "(envelope #>> '{{data,user_id}}') = ANY(%s::text[]) "
        "OR (envelope ->> 'aggregate_id') = ANY(%s::text[]))",
        ([str(u) for u in users], [str(u) for u in users]),
    )


def about(body: bytes, users: Collection[str]) -> bool:
    """Whether a dead-lettered message's envelope is about one of `users` (ids as text)."""
    try:
        envelope = json.loads(body)
    except ValueError:
        return False
    if not isinstance(envelope, dict):
        return False
    data = envelope.get("data")
    user = data.get("user_id") if isinstance(data, dict) else None
    return str(user) in users or str(envelope.get("aggregate_id")) in users


async def purge_dead_letters(amqp_url: str, service: str, users: Collection[uuid.UUID]) -> int:
    """Drop the messages of `<service>.dlq` about `users`; the others stay, in their order."""
    wanted = {str(u) for u in users}
    connection = await amqp.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(dead_letter_queue(service), passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return 0  # the consumer never declared it: nothing was ever dead-lettered
        dropped = 0
        while True:
            message = await queue.get(no_ack=False, fail=False, timeout=10)
            if message is None:
                break
            if about(message.body, wanted):
                await message.ack()
                dropped += 1
        with contextlib.suppress(Exception):
            await channel.close()  # the unsettled messages go back to the queue
        return dropped


async def nothing_else(
    conn: psycopg.AsyncConnection[Any], erasures: dict[uuid.UUID, datetime]
) -> Collection[uuid.UUID]:
    """The hook of a projection with nothing outside its database (reporting_svc)."""
    return list(erasures)


class ErasureSweeper:
    """Completes erasures beside the consumer: the service's hook, then the DLQ. Construct,
    then `await run(stop)`."""

    def __init__(
        self,
        service: str,
        *,
        database_url: str,
        amqp_url: str,
        hook: SweepHook = nothing_else,
        interval: float = 1.0,
    ) -> None:
        self.service = service
        self.amqp_url = amqp_url
        self.hook = hook
        self.interval = interval
        self.swept = 0
        self.pool = AsyncConnectionPool(
            kwargs=connection_kwargs(database_url),
            min_size=1,
            max_size=1,
            open=False,
            name=f"{service}.erasure",
        )

    async def run(self, stop: asyncio.Event) -> None:
        opened = False
        try:
            while not stop.is_set():
                try:
                    if not opened:
                        await self.pool.open(wait=True, timeout=5)
                        opened = True
                    await self.sweep()
                except psycopg.errors.UndefinedTable:
                    pass  # the consumer has not set up its tables yet
                except SWEEP_ERRORS as exc:
                    log.warning("erasure sweep failed; will retry", extra={"error": str(exc)})
                await sleep_unless_stopped(stop, self.interval)
        finally:
            await self.pool.close()

    async def sweep(self) -> int:
        """One pass over the erasures not yet swept; how many it completed."""
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(
                    "SELECT user_id, erased_at FROM public.erasures WHERE swept_at IS NULL "
                    "ORDER BY erased_at LIMIT 500"
                )
            ).fetchall()
            if not rows:
                return 0
            ready = list(await self.hook(conn, {r[0]: r[1] for r in rows}))
            if not ready:
                return 0
            dropped = await purge_dead_letters(self.amqp_url, self.service, ready)
            await conn.execute(
                "UPDATE public.erasures SET swept_at = now() WHERE user_id = ANY(%s::uuid[])",
                (ready,),
            )
            await conn.commit()
        self.swept += len(ready)
        log.info(
            "erasures swept",
            extra={"service": self.service, "people": len(ready), "dead_letters_dropped": dropped},
        )
        return len(ready)
