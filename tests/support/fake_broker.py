"""A broker in memory: enough of aio-pika for the consumer's and the replay's real logic.

`Consumer._process(channel, batch)` takes incoming messages (body, headers, delivery tag,
`redelivered`, `ack`) and a channel whose `<service>.dlx` it publishes poison to;
`Replay._apply(batch, ...)` takes `servicekit.stream.HistoryMessage`s. This module
gives both, over a model of one quorum queue:

- `ready`: messages waiting, in order; messages returned by a lost connection go first, in
  the order they were delivered, with `x-delivery-count` one higher and `redelivered` set;
- the deliveries of the current channel not yet acked (`FakeChannel.unacked`);
- `dead_letters`: what reached `<service>.dlq`, in order; `retry` sends one back to the tail
  of the live queue as a new message, like `esctl dlq retry`.

A channel can lose its connection after a number of operations: later acks are lost (sent
into a dead socket, `lost`) or raise (`noticed`), and later publishes raise (no confirm).
Each incoming message remembers what the consumer *said* about it (`claim`): "acked" when an
ack covering it was sent, "dead_lettered" when it was acked right after its body was
published to the dead-letter exchange, whether or not the broker got the ack.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import aio_pika

Claim = Literal["acked", "dead_lettered"]

# Headers the broker sets, which `esctl dlq retry` drops (see esctl.operate.BROKER_HEADERS).
BROKER_HEADERS = ("x-death", "x-first-death", "x-last-death", "x-delivery-count")


@dataclass
class Stored:
    """A message in the queue: what was published, and how often it was returned."""

    body: bytes
    message_id: str
    routing_key: str
    exchange: str
    headers: dict[str, Any] = field(default_factory=dict)
    returns: int = 0  # x-delivery-count: deliveries that ended without an ack

    @property
    def redelivered(self) -> bool:
        return self.returns > 0


class FakeIncomingMessage:
    """One delivery of a `Stored` message on a `FakeChannel`."""

    def __init__(self, channel: FakeChannel, tag: int, stored: Stored) -> None:
        self.channel = channel
        self.stored = stored
        self.delivery_tag = tag
        self.body = stored.body
        self.message_id = stored.message_id
        self.routing_key = stored.routing_key
        self.exchange = stored.exchange
        self.content_type = "application/json"
        self.timestamp = None
        self.redelivered = stored.redelivered
        self.headers: dict[str, Any] = dict(stored.headers)
        if stored.returns:
            self.headers["x-delivery-count"] = stored.returns
        self.claim: Claim | None = None
        self._processed = False

    @property
    def processed(self) -> bool:
        return self._processed

    async def ack(self, multiple: bool = False) -> None:
        if self._processed:
            raise AssertionError(f"message {self.delivery_tag} acked twice")
        self.channel.basic_ack(self, multiple=multiple)
        self._processed = True

    async def nack(self, *_: Any, **__: Any) -> None:
        raise AssertionError("the consumer never nacks: it retries in place or dead-letters")

    async def reject(self, *_: Any, **__: Any) -> None:
        raise AssertionError("the consumer never rejects: it retries in place or dead-letters")


class FakeExchange:
    def __init__(self, channel: FakeChannel, name: str) -> None:
        self.channel = channel
        self.name = name

    async def publish(self, message: aio_pika.Message, routing_key: str) -> None:
        self.channel.operation()
        if self.channel.dead:
            raise ConnectionError("connection lost: the publish was not confirmed")
        self.channel.queue.dead_letters.append(
            Stored(
                body=message.body,
                message_id=message.message_id or "",
                routing_key=routing_key,
                exchange=self.name,
                headers=dict(message.headers or {}),
            )
        )
        self.channel.last_published = message.body


class FakeChannel:
    """A channel: delivery tags, unacked deliveries, and an optional connection loss."""

    def __init__(self, queue: FakeQueue) -> None:
        self.queue = queue
        self.next_tag = 1
        self.unacked: dict[int, FakeIncomingMessage] = {}
        self.dies_after: int | None = None  # operations (acks, publishes) before the loss
        self.noticed = False  # after the loss: acks raise (True) or vanish (False)
        self.operations = 0
        self.dead = False
        self.last_published: bytes | None = None

    def lose_connection_after(self, operations: int, *, noticed: bool) -> None:
        self.dies_after, self.noticed = operations, noticed

    def operation(self) -> None:
        if self.dies_after is not None and self.operations >= self.dies_after:
            self.dead = True
        self.operations += 1

    async def get_exchange(self, name: str, ensure: bool = True) -> FakeExchange:
        assert name == self.queue.dead_letter_exchange, f"unexpected exchange {name}"
        return FakeExchange(self, name)

    def deliver(self, stored: Stored) -> FakeIncomingMessage:
        message = FakeIncomingMessage(self, self.next_tag, stored)
        self.unacked[self.next_tag] = message
        self.next_tag += 1
        return message

    def basic_ack(self, message: FakeIncomingMessage, *, multiple: bool) -> None:
        tag = message.delivery_tag
        if tag not in self.unacked:  # RabbitMQ closes the channel: PRECONDITION_FAILED
            raise AssertionError(f"unknown delivery tag {tag}")
        covered = [m for t, m in self.unacked.items() if t <= tag] if multiple else [message]
        if not multiple and self.last_published == message.body:
            message.claim = "dead_lettered"
        else:
            for m in covered:
                m.claim = m.claim or "acked"
        self.last_published = None
        self.operation()
        if self.dead:
            if self.noticed:
                raise ConnectionError("connection lost: channel is closed")
            return  # written into a socket that is gone: the broker never sees it
        for m in covered:
            del self.unacked[m.delivery_tag]


class FakeQueue:
    """One service's live queue (quorum, single active consumer) and its dead-letter queue."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.dead_letter_exchange = f"{service}.dlx"
        self.ready: deque[Stored] = deque()
        self.dead_letters: list[Stored] = []
        self.channel = FakeChannel(self)

    def publish(self, stored: Stored) -> None:
        self.ready.append(stored)

    def deliver(self, count: int) -> list[FakeIncomingMessage]:
        """Up to `count` ready messages, delivered on the current channel."""
        batch = []
        while self.ready and len(batch) < count:
            batch.append(self.channel.deliver(self.ready.popleft()))
        return batch

    def lose_connection(self) -> int:
        """The connection goes away: unacked deliveries go back first, counted. How many."""
        returned = [self.channel.unacked[t] for t in sorted(self.channel.unacked)]
        for message in reversed(returned):
            message.stored.returns += 1
            self.ready.appendleft(message.stored)
        self.channel = FakeChannel(self)
        return len(returned)

    def retry(self, index: int) -> Stored:
        """`esctl dlq retry`: the dead letter goes to the tail of the live queue, anew."""
        letter = self.dead_letters.pop(index)
        headers = {k: v for k, v in letter.headers.items() if not k.startswith(BROKER_HEADERS)}
        headers["x-retried-at"] = "now"
        again = Stored(letter.body, letter.message_id, letter.routing_key, "", headers)
        self.ready.append(again)
        return again
