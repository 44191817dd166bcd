"""integration_svc.q is bound only to what some endpoint subscribes to (and to
`auth.account.deleted`, which every projection needs for erasure), not to every event.

A queue bound to `#` made the broker store, and integration_svc apply, every event of the
system (a login each, and every profile edit) to find that no endpoint wanted most of them.
The bindings follow `public.webhook_endpoints`:

- a change of endpoints (`esctl webhooks add` and `remove`, the webhooks file at start) takes
  BINDINGS_LOCK, changes the table and binds the queue to what is now wanted before it
  commits, so an event published once an endpoint exists is routed to the queue: none is
  missed in between. What is no longer wanted is unbound after the commit, under the lock
  again (a removed endpoint keeps its events until its removal is visible);
- the consumer, each time it connects (after declaring its queue), does the same with the
  table as it is: endpoints written by other means, and a queue that was deleted and
  declared again, are bound too. When it cannot read the table then, it binds `#` (a
  superset: the projection still delivers only what endpoints match), and the next
  reconciliation unbinds it.

`public.webhook_bindings` records what was bound, so that what is no longer wanted can be
unbound (AMQP cannot list a queue's bindings). `#` is always unbound when not wanted: older
builds bound it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import aio_pika
import psycopg
from aio_pika.abc import AbstractChannel

from servicekit import amqp
from servicekit.amqp import declare_producer_exchange
from shared_contracts.events import AccountDeleted
from shared_contracts.names import AUTH_EVENTS, USER_EVENTS, live_queue

T = TypeVar("T")

SERVICE = "integration_svc"
ALWAYS = (AccountDeleted.event_type,)
EVERYTHING = "#"
EXCHANGES = (AUTH_EVENTS, USER_EVENTS)
BINDINGS_LOCK = int.from_bytes(
    hashlib.blake2b(b"integration_svc:bindings", digest_size=8).digest(), "big", signed=True
)
DDL = (
    "CREATE TABLE IF NOT EXISTS public.webhook_bindings (routing_key text PRIMARY KEY, "
    "bound_at timestamptz NOT NULL DEFAULT now())",
)


def wanted_keys(patterns: Iterable[Iterable[str]]) -> set[str]:
    """The routing keys integration_svc.q needs for endpoints subscribed to `patterns`.

    Event types are routing keys and endpoint patterns are topic patterns over them, so the
    patterns are the bindings; `#` covers every other one.
    """
    keys = {p for endpoint in patterns for p in endpoint} | set(ALWAYS)
    return {EVERYTHING} if EVERYTHING in keys else keys


LOCK = "SELECT pg_advisory_xact_lock(%s)"
PATTERNS = "SELECT events FROM public.webhook_endpoints"
RECORDED = "SELECT routing_key FROM public.webhook_bindings"
FORGET = "DELETE FROM public.webhook_bindings WHERE routing_key <> ALL(%s)"
RECORD = (
    "INSERT INTO public.webhook_bindings (routing_key) SELECT unnest(%s::text[]) "
    "ON CONFLICT DO NOTHING"
)


def plan(patterns: Iterable[Iterable[str]], recorded: Iterable[str]) -> tuple[list[str], list[str]]:
    """(keys to bind, keys to unbind): what the endpoints want, and what was bound (or `#`,
    which older builds bound) that they no longer want."""
    wanted = wanted_keys(patterns)
    return sorted(wanted), sorted(({*recorded, EVERYTHING}) - wanted)


async def apply_bindings(channel: AbstractChannel, bind: list[str], unbind: list[str]) -> bool:
    """Bind and unbind integration_svc.q on both producer exchanges; False when the queue
    does not exist yet (the consumer declares it, then reconciles)."""
    try:
        queue = await channel.declare_queue(live_queue(SERVICE), passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    for name in EXCHANGES:
        exchange = await declare_producer_exchange(channel, name)
        for key in bind:
            await queue.bind(exchange, routing_key=key)
        for key in unbind:
            await queue.unbind(exchange, routing_key=key)
    return True


async def lock(conn: psycopg.AsyncConnection[Any]) -> None:
    """Serialize changes of endpoints and bindings (within the caller's transaction)."""
    await conn.execute(LOCK, (BINDINGS_LOCK,))


async def reconcile(
    conn: psycopg.AsyncConnection[Any], channel: AbstractChannel, *, unbind: bool = True
) -> list[str]:
    """Bind the queue to what the endpoints in the table want, unbind the rest, and record
    it, in the caller's transaction (the consumer's, each time it connects). With
    `unbind=False`, in the transaction that changed the endpoints (before it commits): only
    bind what they now want; a reconciliation after the commit unbinds the rest."""
    await lock(conn)
    patterns = [row[0] for row in await (await conn.execute(PATTERNS)).fetchall()]
    recorded = [row[0] for row in await (await conn.execute(RECORDED)).fetchall()]
    bind, stale = plan(patterns, recorded)
    if await apply_bindings(channel, bind, stale if unbind else []):
        if unbind:
            await conn.execute(FORGET, (bind,))
        await conn.execute(RECORD, (bind,))
    return bind


async def bind_everything(channel: AbstractChannel) -> None:
    """The safe superset, when the table cannot be read."""
    await apply_bindings(channel, [EVERYTHING], [])


def changing_endpoints(conn: psycopg.Connection[Any], amqp_url: str, change: Callable[[], T]) -> T:
    """Run `change` (writes to `public.webhook_endpoints` on `conn`) with the queue bound to
    match: what it now wants is bound before the change commits, so an event published once
    the change is visible is routed as it says; what it no longer wants is unbound after (a
    removed endpoint keeps its events until its removal is committed). A broker that cannot
    be reached fails the change: nothing is written."""
    return asyncio.run(_changing(conn, amqp_url, change))


async def _changing(conn: psycopg.Connection[Any], amqp_url: str, change: Callable[[], T]) -> T:
    # The database calls block this loop: it runs only this (the CLI's) change.
    connection = await amqp.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        with conn.transaction():
            conn.execute(LOCK, (BINDINGS_LOCK,))
            result = change()
            bind, _ = plan(*_bindings_of(conn))
            if await apply_bindings(channel, bind, []):
                conn.execute(RECORD, (bind,))
        with conn.transaction():
            conn.execute(LOCK, (BINDINGS_LOCK,))
            bind, unbind = plan(*_bindings_of(conn))
            if await apply_bindings(await connection.channel(), [], unbind):
                conn.execute(FORGET, (bind,))
        return result


def _bindings_of(conn: psycopg.Connection[Any]) -> tuple[list[list[str]], list[str]]:
    """(each endpoint's patterns, the routing keys recorded as bound)."""
    return (
        [row[0] for row in conn.execute(PATTERNS).fetchall()],
        [row[0] for row in conn.execute(RECORDED).fetchall()],
    )
