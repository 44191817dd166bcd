"""RabbitMQ topology, declared once here and used by relays, consumers and the CLI."""

from __future__ import annotations

from urllib.parse import urlsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from shared_contracts.names import HISTORY_STREAM, dead_letter_queue, live_queue


def broker_address(amqp_url: str) -> str:
    """host:port of an AMQP URL, for messages that tell an operator what to start."""
    parts = urlsplit(amqp_url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}"


async def declare_producer_exchange(channel: AbstractChannel, exchange: str) -> AbstractExchange:
    """A producer's durable topic exchange, with the history stream bound to it."""
    declared = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    history = await declare_history_stream(channel)
    await history.bind(declared, routing_key="#")
    return declared


async def declare_history_stream(channel: AbstractChannel) -> AbstractQueue:
    """`events.history`: the retained log of every public event, read by replays."""
    return await channel.declare_queue(
        HISTORY_STREAM, durable=True, arguments={"x-queue-type": "stream"}
    )


def dead_letter_exchange(service: str) -> str:
    return f"{service}.dlx"


async def declare_consumer_queues(
    channel: AbstractChannel,
    service: str,
    bindings: dict[str, list[str]],
    *,
    delivery_limit: int,
) -> AbstractQueue:
    """`<service>.q` (quorum, single active consumer, delivery limit) and `<service>.dlq`.

    `bindings` maps a producer exchange to the routing keys the service handles.
    """
    dlx = await channel.declare_exchange(
        dead_letter_exchange(service), aio_pika.ExchangeType.FANOUT, durable=True
    )
    dlq = await channel.declare_queue(
        dead_letter_queue(service), durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dlq.bind(dlx)
    queue = await channel.declare_queue(
        live_queue(service),
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": dead_letter_exchange(service),
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )
    for exchange, routing_keys in bindings.items():
        declared = await declare_producer_exchange(channel, exchange)
        for key in routing_keys:
            await queue.bind(declared, routing_key=key)
    return queue
