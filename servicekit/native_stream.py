"""Reading `events.history` over RabbitMQ's native stream protocol (rstream, port 5552).

The same `HistoryMessage`s as the AMQP 0.9.1 reader (servicekit.stream), read faster: the
broker sends whole chunks of the stream's log as they are stored, each for one credit, where
AMQP 0.9.1 sends one frame set per message. Measured here (python -m bench.replay_stream):
about 1.6-1.9x the raw AMQP rate on a stream written in batches, as a relay catching up
writes it.

- Credit: a chunk costs one credit, granted back as it arrives. On a stream the live relays
  wrote (one message a chunk, ten a second) each message is then a chunk, so the credit is
  `CREDIT` chunks: enough to keep the socket busy while the previous ones are handled.
- Memory: what arrives is buffered until `take`; once the buffer holds `prefetch` messages,
  the delivery callback waits (and so grants no more credit) until it drains: at most
  `prefetch` messages plus `CREDIT` chunks in memory.
- Decoding: servicekit.amqp10 reads only the body, the application properties and the app
  id (rstream's `amqp_decoder` decodes every section, in pure Python, 10x slower).
- A cluster: the nodes of AMQP_URL are tried in turn, each on the stream port, with the
  same credentials and vhost. rstream then reads from a replica of the stream or its leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from rstream import Consumer, ConsumerOffsetSpecification, OffsetType
from rstream import schema as rstream_schema

from servicekit import amqp10
from servicekit.amqp import amqp_urls, connect, declare_history_stream
from servicekit.stream import AmqpHistory, AnyConnection, HistoryMessage, HistoryReader, Start
from shared_contracts.names import HISTORY_STREAM

log = logging.getLogger("servicekit.native_stream")

DEFAULT_STREAM_PORT = 5552
CREDIT = 64  # chunks in flight: hides the credit round trip of one-message chunks
CREDIT_BACK = 16  # credit granted back this many chunks at a time (rstream: one a chunk)
CONNECT_TIMEOUT_SECONDS = 5.0
SUBSCRIBE_ATTEMPTS = 3  # each on a fresh connection after the first (see NativeHistory)


@dataclass(frozen=True)
class StreamNode:
    """Where and as whom to speak the stream protocol: an AMQP URL's host, port 5552."""

    host: str
    port: int
    username: str
    password: str
    vhost: str
    tls: bool

    @classmethod
    def of(cls, amqp_url: str, port: int) -> StreamNode:
        parts = urlsplit(amqp_url)
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            username=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            vhost=vhost,
            tls=parts.scheme == "amqps",
        )

    def consumer(self) -> Consumer:
        return _ChunkConsumer(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            vhost=self.vhost,
            ssl_context=ssl.create_default_context() if self.tls else None,
            connection_name="eskit-replay",
            max_retries=1,
        )

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class NativeHistory:
    """The stream over the native protocol: one rstream Consumer (a connection) for each
    subscription at a time, kept for the next one."""

    protocol = "native stream protocol"

    def __init__(self, node: StreamNode, first: Consumer, *, credit: int = CREDIT) -> None:
        self.node = node
        self.credit = credit
        self._idle: list[Consumer] = [first]
        self._all: list[Consumer] = [first]

    @contextlib.asynccontextmanager
    async def subscribe(self, start: Start, *, prefetch: int) -> AsyncIterator[_Subscription]:
        subscription = _Subscription(prefetch)
        if start == "first":
            spec = ConsumerOffsetSpecification(OffsetType.FIRST, None)
        elif start == "last":
            spec = ConsumerOffsetSpecification(OffsetType.LAST, None)
        else:
            spec = ConsumerOffsetSpecification(OffsetType.OFFSET, int(start))
        # A subscription on a kept connection has been seen to go unanswered (rstream's
        # request timed out) while retention was dropping the stream's first segments: the
        # connection is then given up and the subscription made again on a fresh one.
        for attempt in range(1, SUBSCRIBE_ATTEMPTS + 1):
            consumer = await self._consumer()
            try:
                subscriber = await consumer.subscribe(
                    HISTORY_STREAM,
                    cast(Any, subscription.on_chunk),
                    decoder=_raw,
                    offset_specification=spec,
                    initial_credit=self.credit,
                )
                break
            except (TimeoutError, OSError):
                log.warning("subscribing to %s failed (attempt %d)", HISTORY_STREAM, attempt)
                await self._discard(consumer)
                if attempt == SUBSCRIBE_ATTEMPTS:
                    raise
        try:
            yield subscription
        finally:
            subscription.closed = True
            subscription.release()
            try:
                await consumer.unsubscribe(subscriber)
            except Exception:  # a broken connection: do not reuse it
                log.debug("unsubscribe failed; closing the connection", exc_info=True)
                await self._discard(consumer)
            else:
                self._idle.append(consumer)

    async def _consumer(self) -> Consumer:
        """A kept connection, or a new one."""
        if self._idle:
            return self._idle.pop()
        consumer = self.node.consumer()
        self._all.append(consumer)
        await asyncio.wait_for(consumer.start(), CONNECT_TIMEOUT_SECONDS)
        return consumer

    async def _discard(self, consumer: Consumer) -> None:
        with contextlib.suppress(Exception):
            await consumer.close()
        if consumer in self._all:
            self._all.remove(consumer)

    async def close(self) -> None:
        for consumer in self._all:
            with contextlib.suppress(Exception):
                await consumer.close()
        self._all.clear()
        self._idle.clear()


def _raw(data: bytes) -> bytes:
    return data


class _ChunkConsumer(Consumer):
    """rstream's Consumer, handing each chunk to the subscription whole, and granting credit
    back `CREDIT_BACK` chunks at a time.

    rstream 1.1.1 (pinned in uv.lock) sends a credit frame for every chunk and calls back
    for every message with a context object: on a stream of one-message chunks that is a
    syscall and several calls per message (about a third of a replay's time, profiled).
    This overrides its private `_on_deliver`, keeping its semantics (messages before the
    requested offset in the first chunk are skipped; the subscriber's offset moves on);
    tests/integration/test_replay_stream.py compares what it reads with the AMQP reader.
    """

    _owed: dict[int, int]

    async def _on_deliver(
        self, frame: rstream_schema.Deliver, subscriber: Any, filter_value: Any
    ) -> None:
        if frame.subscription_id != subscriber.subscription_id:
            return
        owed = getattr(self, "_owed", None)
        if owed is None:
            owed = self._owed = {}
        due = owed.get(subscriber.subscription_id, 0) + 1
        if due >= CREDIT_BACK:
            await subscriber.client.credit(subscriber.subscription_id, due)
            due = 0
        owed[subscriber.subscription_id] = due
        first = frame.chunk_first_offset
        messages = frame.get_messages()
        if subscriber.offset_type is OffsetType.OFFSET and subscriber.offset > first:
            skip = subscriber.offset - first
            messages, first = messages[skip:], first + skip
        subscriber.offset = frame.chunk_first_offset + frame.num_entries
        if messages:
            waiting = subscriber.callback(first, messages)
            if waiting is not None:
                await waiting


class _Subscription:
    """What rstream delivers, buffered until `take`; the delivery waits while it is full."""

    def __init__(self, prefetch: int) -> None:
        self.buffer: deque[tuple[int, bytes]] = deque()
        self.prefetch = max(prefetch, 1)
        self.arrived = asyncio.Event()
        self.drained: asyncio.Future[None] | None = None
        self.closed = False

    def on_chunk(self, first: int, messages: list[bytes]) -> Awaitable[None] | None:
        self.buffer.extend(zip(range(first, first + len(messages)), messages, strict=True))
        self.arrived.set()
        if len(self.buffer) < self.prefetch or self.closed:
            return None
        self.drained = asyncio.get_running_loop().create_future()
        return self.drained  # rstream awaits it before the next chunk: back-pressure

    def release(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    async def take(self, limit: int, wait: float, linger: float) -> list[HistoryMessage]:
        if not self.buffer:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout=max(wait, 0.0))
            except TimeoutError:
                return []
        if linger > 0 and len(self.buffer) < limit:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + linger
            # Polled like servicekit.batching.fill: one wake-up each 2 ms, not one a message.
            while len(self.buffer) < limit and loop.time() < deadline and self.drained is None:  # noqa: ASYNC110
                await asyncio.sleep(0.002)
        buffer, decode = self.buffer, amqp10.decode
        batch = []
        for _ in range(min(limit, len(buffer))):
            offset, data = buffer.popleft()
            decoded = decode(data)
            batch.append(HistoryMessage(offset, decoded.properties, decoded.body, decoded.app_id))
        if len(buffer) < self.prefetch // 2:
            self.release()
        return batch


async def open_native(
    amqp_url: str, port: int = DEFAULT_STREAM_PORT, *, credit: int = CREDIT
) -> NativeHistory:
    """The native reader on the first node of `amqp_url` that answers on `port`.

    Raises the last node's error when none does (the plugin is off, the port closed, or it
    is another broker's: one without the stream AMQP has just declared).
    """
    error: BaseException | None = None
    for url in amqp_urls(amqp_url):
        node = StreamNode.of(url, port)
        consumer = node.consumer()
        try:
            await asyncio.wait_for(consumer.start(), CONNECT_TIMEOUT_SECONDS)
            # The stream was just declared over AMQP: a port that answers without it belongs
            # to another broker (a private test broker's host also runs one on 5552).
            if not await asyncio.wait_for(
                consumer.stream_exists(HISTORY_STREAM), CONNECT_TIMEOUT_SECONDS
            ):
                msg = f"{node} answers but has no {HISTORY_STREAM}: another broker?"
                raise LookupError(msg)
        except Exception as exc:  # noqa: BLE001 - try the next node, raise the last error
            error = exc
            with contextlib.suppress(Exception):
                await consumer.close()
            continue
        return NativeHistory(node, consumer, credit=credit)
    assert error is not None
    raise error


@contextlib.asynccontextmanager
async def history_reader(
    amqp_url: str, stream_port: int | None = DEFAULT_STREAM_PORT
) -> AsyncIterator[tuple[HistoryReader, AnyConnection]]:
    """The fastest reader of events.history the broker offers, and an AMQP connection.

    The stream is declared over AMQP first (a fresh vhost has none). Then the native
    protocol, unless `stream_port` is None; where no node answers on it (the plugin
    `rabbitmq_stream` is off), the AMQP 0.9.1 reader, with a warning that it is slower.
    """
    connection = await connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare_history_stream(channel)
        await channel.close()
        if stream_port is None:
            yield AmqpHistory(connection), connection
            return
        try:
            native = await open_native(amqp_url, stream_port)
        except Exception as exc:  # noqa: BLE001 - any failure: fall back, and say so
            log.warning(
                "the native stream protocol does not answer (plugin rabbitmq_stream off, or "
                "the port closed); reading events.history over AMQP 0.9.1, which is slower "
                "(about half the rate). Enable it: rabbitmq-plugins enable rabbitmq_stream",
                extra={
                    "port": stream_port,
                    "nodes": [str(StreamNode.of(u, stream_port)) for u in amqp_urls(amqp_url)],
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                },
            )
            yield AmqpHistory(connection), connection
            return
        try:
            yield native, connection
        finally:
            await native.close()
