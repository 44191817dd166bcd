"""A subscriber to eskit's events written with FastStream, as a team outside the repository
would write it: it needs only `eskit-contracts` (contracts-dist/) and `faststream[rabbit]`.

- its own durable quorum queue, bound to the two producer exchanges for what it needs, read
  one message at a time so that each producer's order is kept;
- every message read with `shared_contracts.subscriber.read`: a typed event, or a reason to
  skip it (an unknown event type, a newer schema version than this build knows: acked and
  skipped, since the producer publishes the old version beside it);
- deduplicated by `event_id` in the same SQLite transaction as the change (directory.py),
  acked only after that commit;
- a message that is not an envelope, or whose data fails its contract, is rejected (to the
  queue's dead-letter exchange, if you give it one) instead of being retried forever.

Run it: `python -m examples.faststream_subscriber` (settings below, from the environment).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from faststream import AckPolicy, FastStream
from faststream.rabbit import (
    Channel,
    ExchangeType,
    QueueType,
    RabbitBroker,
    RabbitExchange,
    RabbitMessage,
    RabbitQueue,
)
from pydantic import ValidationError

from examples.faststream_subscriber.directory import Directory
from shared_contracts.names import AUTH_EVENTS, USER_EVENTS
from shared_contracts.subscriber import Skipped, read

log = logging.getLogger("directory_subscriber")

# What this subscriber needs, by exchange: the routing key is the event type.
BINDINGS: dict[str, tuple[str, ...]] = {
    AUTH_EVENTS: ("auth.account.registered",),
    USER_EVENTS: ("user.profile.*",),
}


@dataclass(frozen=True)
class Settings:
    amqp_url: str
    database: Path
    queue: str

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            amqp_url=os.environ.get("SUBSCRIBER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
            database=Path(os.environ.get("SUBSCRIBER_DATABASE", "directory.sqlite3")),
            queue=os.environ.get("SUBSCRIBER_QUEUE", "directory_example.q"),
        )


def build_app(settings: Settings) -> FastStream:
    broker = RabbitBroker(settings.amqp_url)
    directory = Directory(settings.database)
    queue = RabbitQueue(
        settings.queue,
        queue_type=QueueType.QUORUM,
        durable=True,
        arguments={
            # Replicas may run: one consumes, the others stand by, so order is kept.
            "x-single-active-consumer": True,
            # A backstop: a message that kills the process every time stops after 20 tries.
            "x-delivery-limit": 20,
        },
    )

    # One message at a time, in queue order (per producer, that is position order): FastStream
    # would otherwise handle the prefetched messages concurrently. Ack after the handler
    # returns, requeue when it raises (e.g. the database is locked).
    @broker.subscriber(queue, channel=Channel(prefetch_count=1), ack_policy=AckPolicy.NACK_ON_ERROR)
    async def on_event(message: RabbitMessage) -> None:
        try:
            received = read(message.body)
        except ValidationError as exc:
            log.warning("rejected message %s: %s", message.message_id, exc.errors()[:1])
            await message.reject()
            return
        envelope = received.envelope
        if isinstance(received, Skipped):
            log.info(
                "skipped %s %s v%d %s",
                received.reason,
                envelope.event_type,
                envelope.schema_version,
                envelope.event_id,
            )
            return
        outcome = await asyncio.to_thread(directory.apply, received)
        log.info(
            "%s %s %s%s",
            outcome,
            envelope.event_type,
            envelope.event_id,
            " (redelivered)" if message.raw_message.redelivered else "",
        )

    app = FastStream(broker)

    @app.after_startup
    async def bind_queue() -> None:
        declared = await broker.declare_queue(queue)
        for name, routing_keys in BINDINGS.items():
            exchange = await broker.declare_exchange(
                RabbitExchange(name, type=ExchangeType.TOPIC, durable=True)
            )
            for routing_key in routing_keys:
                await declared.bind(exchange, routing_key=routing_key)
        log.info("subscribed %s to %s", settings.queue, BINDINGS)

    return app
