"""Reading `events.history`, the stream of every public event.

A stream is read from an offset ("first", "last", or a number); each message carries its own
offset. Nothing here waits for the stream to go quiet except where quiet is the answer (the
end of an empty stream): under steady traffic a stream never is.

Two readers give the same `HistoryMessage`s behind one interface (`HistoryReader`): the
native stream protocol (servicekit.native_stream, port 5552, plugin `rabbitmq_stream`),
which a replay uses when the broker answers on it, and AMQP 0.9.1 (`AmqpHistory`, here),
its fallback, about half as fast.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractRobustConnection
from pydantic import ValidationError

from servicekit.amqp import declare_history_stream
from servicekit.batching import fill
from servicekit.messages import RUN, RUN_FROM, RUN_PRODUCER, RUN_TO, STREAM_OFFSET, TRACEPARENT
from servicekit.projection import Projection
from shared_contracts.envelope import Envelope
from shared_contracts.names import PRODUCER_EXCHANGES

AnyConnection = AbstractConnection | AbstractRobustConnection
Start = str | int  # "first", "last", or an offset


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    """A message read from the stream, whichever protocol read it."""

    offset: int
    headers: Mapping[str, Any]  # AMQP 0.9.1 headers (application properties in AMQP 1.0)
    body: bytes
    app_id: str | None = None  # the producer that published it

    @property
    def traceparent(self) -> str | None:
        value = self.headers.get(TRACEPARENT)
        return value if isinstance(value, str) else None


class Subscription(Protocol):
    async def take(self, limit: int, wait: float, linger: float) -> list[HistoryMessage]:
        """Up to `limit` messages in stream order: waits up to `wait` seconds for the first
        ([] if none came), then up to `linger` more for the batch to fill."""
        ...


class HistoryReader(Protocol):
    protocol: str  # what it speaks, for logs and progress

    def subscribe(
        self, start: Start, *, prefetch: int
    ) -> contextlib.AbstractAsyncContextManager[Subscription]:
        """Read from `start`, with about `prefetch` messages read ahead."""
        ...


class AmqpHistory:
    """The stream over AMQP 0.9.1 (aio-pika): a consumer with prefetch on one channel."""

    protocol = "AMQP 0.9.1"

    def __init__(self, connection: AnyConnection) -> None:
        self.connection = connection

    @contextlib.asynccontextmanager
    async def subscribe(self, start: Start, *, prefetch: int) -> AsyncIterator[Subscription]:
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        channel = await self.connection.channel()
        try:
            await channel.set_qos(prefetch_count=prefetch)
            stream = await declare_history_stream(channel)
            await stream.consume(inbox.put, arguments={STREAM_OFFSET: start}, no_ack=False)
            yield _AmqpSubscription(inbox)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()


class _AmqpSubscription:
    def __init__(self, inbox: asyncio.Queue[AbstractIncomingMessage]) -> None:
        self.inbox = inbox
        self.unacked: AbstractIncomingMessage | None = None

    async def take(self, limit: int, wait: float, linger: float) -> list[HistoryMessage]:
        if self.unacked is not None:  # the previous batch is done with: credit for more
            await self.unacked.ack(multiple=True)
            self.unacked = None
        batch: list[AbstractIncomingMessage] = []
        try:
            batch.append(await asyncio.wait_for(self.inbox.get(), timeout=max(wait, 0.0)))
        except TimeoutError:
            return []
        await fill(batch, self.inbox, limit=limit, linger=linger)
        self.unacked = batch[-1]
        return [from_amqp(m) for m in batch]


def from_amqp(message: AbstractIncomingMessage) -> HistoryMessage:
    headers = dict(message.headers or {})
    offset = int(str(headers.pop(STREAM_OFFSET, -1)))
    return HistoryMessage(offset, headers, message.body, message.app_id)


def reader_of(source: HistoryReader | AnyConnection) -> HistoryReader:
    """A reader, or an AMQP connection to read over (the AMQP 0.9.1 reader)."""
    if isinstance(source, AbstractConnection | AbstractRobustConnection):
        return AmqpHistory(source)
    return source


def offset_of(message: HistoryMessage) -> int:
    return message.offset


def traceparent_of(message: HistoryMessage) -> str | None:
    return message.traceparent


async def first_offset(source: HistoryReader | AnyConnection) -> int | None:
    async with contextlib.aclosing(scan(source, "first", None, 0.5, limit=1)) as messages:
        async for message in messages:
            return message.offset
    return None


async def end_offset(source: HistoryReader | AnyConnection, window: float = 0.3) -> int:
    """The stream's last offset, or a little beyond: read from its last chunk for `window`.

    Reading stops after `window` seconds however busy the stream is (under steady traffic
    it is never quiet), or sooner once the last chunk has been read.
    """
    last = -1
    async for message in scan(source, "last", None, 0.1, seconds=window):
        last = max(last, message.offset)
    return last


async def scan(
    source: HistoryReader | AnyConnection,
    start: Start,
    end: int | None,
    idle: float,
    *,
    limit: int | None = None,
    seconds: float | None = None,
) -> AsyncGenerator[HistoryMessage]:
    """Read the stream from `start` until `end`, `limit` messages, `seconds`, or `idle`
    seconds of quiet (the end of an empty or finished stream)."""
    seen = 0
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    async with reader_of(source).subscribe(start, prefetch=1000) as subscription:
        while limit is None or seen < limit:
            wait = idle if deadline is None else min(idle, deadline - loop.time())
            if wait <= 0:
                return
            want = 1000 if limit is None else min(limit - seen, 1000)
            batch = await subscription.take(want, wait, 0.0)
            if not batch:
                return
            for message in batch:
                seen += 1
                yield message
                if end is not None and message.offset >= end:
                    return


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
    source: HistoryReader | AnyConnection,
    end: int,
    projection: Projection,
    live: set[str],
    idle: float,
) -> dict[str, Refill]:
    """Find, per producer, the latest complete refill (`--from 1`) in the stream.

    A refill is needed for every producer this projection binds that the live generation
    has applied, or that the stream still holds.
    """
    runs: dict[str, Refill] = {}
    last: dict[str, int] = {}  # stream offset of each run's last message
    bound = set(producers_of(projection))
    needed = live & bound
    async for message in scan(source, "first", end, idle):
        if message.app_id in bound:
            needed.add(str(message.app_id))
        headers = message.headers
        run, producer = headers.get(RUN), headers.get(RUN_PRODUCER)
        if run is None or producer is None:
            continue
        last[str(run)] = message.offset
        if int(str(headers.get(RUN_FROM, 1))) > 1:
            continue
        current = runs.get(str(producer))
        if current is None or (current.run != str(run) and message.offset > current.start):
            runs[str(producer)] = Refill(str(run), message.offset, int(str(headers[RUN_TO])))
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
    message: HistoryMessage,
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
    if not handles(projection, envelope):
        return None
    if phase == 0:
        return envelope
    refill = refills.get(envelope.producer)
    if refill is None or offset < refill.start:
        return None
    in_run = message.headers.get(RUN) == refill.run
    if phase == 1:
        return envelope if in_run else None
    return envelope if not in_run and envelope.position > refill.to else None


_HANDLED: dict[tuple[str, str, str], bool] = {}


def handles(projection: Projection, envelope: Envelope) -> bool:
    """`projection.handles(envelope)`, remembered per producer and type: it matches topic
    patterns with a regex built per call, about 60 µs a message profiled in a replay."""
    key = (projection.name, envelope.producer, envelope.event_type)
    handled = _HANDLED.get(key)
    if handled is None:
        handled = _HANDLED[key] = projection.handles(envelope)
    return handled


def producers_of(projection: Projection) -> list[str]:
    return [p for p, exchange in PRODUCER_EXCHANGES.items() if exchange in projection.bindings]
