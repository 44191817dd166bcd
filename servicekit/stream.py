"""Reading `events.history`, the stream of every public event, over AMQP 0.9.1.

A stream is read from an offset ("first", "last", or a number); each message carries its own
offset. Nothing here waits for the stream to go quiet except where quiet is the answer (the
end of an empty stream): under steady traffic a stream never is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractRobustConnection

from servicekit.amqp import declare_history_stream
from servicekit.messages import STREAM_OFFSET, TRACEPARENT

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
