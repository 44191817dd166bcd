"""Reading `events.history`, the stream of every public event, over AMQP 0.9.1.

A stream is read from an offset ("first", "last", or a number); each message carries its own
offset. Nothing here waits for the stream to go quiet except where quiet is the answer (the
end of an empty stream): under steady traffic a stream never is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractRobustConnection
from pydantic import ValidationError

from servicekit.amqp import declare_history_stream
from servicekit.messages import RUN, RUN_FROM, RUN_PRODUCER, RUN_TO, STREAM_OFFSET, TRACEPARENT
from servicekit.projection import Projection
from shared_contracts.envelope import Envelope
from shared_contracts.names import PRODUCER_EXCHANGES

AnyConnection = AbstractConnection | AbstractRobustConnection


def offset_of(message: AbstractIncomingMessage) -> int:
    return int(str((message.headers or {}).get(STREAM_OFFSET, -1)))


async def first_offset(connection: AnyConnection) -> int | None:
    async for message in scan(connection, "first", None, 0.5, limit=1):
        return offset_of(message)
    return None


async def end_offset(connection: AnyConnection, window: float = 0.3) -> int:
    """The stream's last offset, or a little beyond: read from its last chunk for `window`.

    Reading stops after `window` seconds however busy the stream is (under steady traffic
    it is never quiet), or sooner once the last chunk has been read.
    """
    last = -1
    async for message in scan(connection, "last", None, 0.1, seconds=window):
        last = max(last, offset_of(message))
    return last


async def scan(
    connection: AnyConnection,
    start: str | int,
    end: int | None,
    idle: float,
    *,
    limit: int | None = None,
    seconds: float | None = None,
) -> AsyncIterator[AbstractIncomingMessage]:
    """Read the stream from `start` until `end`, `limit` messages, `seconds`, or `idle`
    seconds of quiet (the end of an empty or finished stream)."""
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1000)
    stream = await declare_history_stream(channel)
    await stream.consume(inbox.put, arguments={STREAM_OFFSET: start}, no_ack=False)
    seen = 0
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    try:
        while limit is None or seen < limit:
            wait = idle if deadline is None else min(idle, deadline - loop.time())
            if wait <= 0:
                return
            try:
                message = await asyncio.wait_for(inbox.get(), timeout=wait)
            except TimeoutError:
                return
            await message.ack()
            seen += 1
            yield message
            if end is not None and offset_of(message) >= end:
                return
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


def traceparent_of(message: AbstractIncomingMessage) -> str | None:
    value = (message.headers or {}).get(TRACEPARENT)
    return value if isinstance(value, str) else None


# -- a stream that retention has truncated ----------------------------------------------------

# When the stream no longer starts at offset 0, the start of a producer's history may be gone.
# A replay then needs, per producer, a complete refill made by `esctl republish <producer>
# --from 1` (messages carrying the `x-republish-*` headers) and reads in two phases: first
# those refills (phase 1), then the live messages that followed them (phase 2). Phase 0 is
# a whole stream.


class RefillMissing(Exception):
    """The stream is truncated and a producer has no complete refill; says what to run."""


@dataclass
class Refill:
    """A complete republish run of one producer found in a truncated stream."""

    run: str
    start: int  # stream offset of its first message
    to: int  # the producer's latest position when the run began
    last: int = -1  # stream offset of its last message


async def find_refills(
    connection: AnyConnection, end: int, projection: Projection, live: set[str], idle: float
) -> dict[str, Refill]:
    """Find, per producer, the latest complete refill (`--from 1`) in the stream.

    A refill is needed for every producer this projection binds that the live generation
    has applied, or that the stream still holds.
    """
    runs: dict[str, Refill] = {}
    last: dict[str, int] = {}  # stream offset of each run's last message
    bound = set(producers_of(projection))
    needed = live & bound
    async for message in scan(connection, "first", end, idle):
        if message.app_id in bound:
            needed.add(str(message.app_id))
        headers = message.headers or {}
        run, producer = headers.get(RUN), headers.get(RUN_PRODUCER)
        if run is None or producer is None:
            continue
        last[str(run)] = offset_of(message)
        if int(str(headers.get(RUN_FROM, 1))) > 1:
            continue
        current = runs.get(str(producer))
        if current is None or (current.run != str(run) and offset_of(message) > current.start):
            runs[str(producer)] = Refill(str(run), offset_of(message), int(str(headers[RUN_TO])))
    for refill in runs.values():
        refill.last = last[refill.run]
    missing = sorted(p for p in needed if p not in runs)
    if missing:
        raise RefillMissing(
            "events.history no longer holds the start of the history (retention removed "
            f"its first messages) and has no complete refill for {', '.join(missing)}. Run "
            + " and ".join(f"`esctl republish {p} --from 1`" for p in missing)
            + ", then replay again."
        )
    return runs


def wanted(
    message: AbstractIncomingMessage,
    offset: int,
    refills: dict[str, Refill],
    phase: int,
    projection: Projection,
) -> Envelope | None:
    """The envelope if this projection applies it in this phase, else None."""
    try:
        envelope = Envelope.model_validate_json(message.body)
    except ValidationError:
        return None
    if not projection.handles(envelope):
        return None
    if phase == 0:
        return envelope
    refill = refills.get(envelope.producer)
    if refill is None or offset < refill.start:
        return None
    in_run = (message.headers or {}).get(RUN) == refill.run
    if phase == 1:
        return envelope if in_run else None
    return envelope if not in_run and envelope.position > refill.to else None


def producers_of(projection: Projection) -> list[str]:
    return [p for p, exchange in PRODUCER_EXCHANGES.items() if exchange in projection.bindings]
