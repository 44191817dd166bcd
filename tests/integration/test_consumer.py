"""The shared consumer runtime: ordering, acks after the handler, skips and the DLQ."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest

from servicekit.batching import Coalescing
from servicekit.consumer import Consumer, one_at_a_time
from servicekit.messages import IncomingEvent, Outcome
from shared_contracts.envelope import Envelope, event_id_for
from shared_contracts.names import dead_letter_queue

EXCHANGE = "auth.events"


def envelope(
    position: int, *, event_type: str = "auth.account.registered", **over: Any
) -> dict[str, Any]:
    user = uuid.uuid4()
    body = {
        "event_id": str(event_id_for("auth_svc", user, 1)),
        "event_type": event_type,
        "schema_version": 1,
        "occurred_at": datetime.now(UTC).isoformat(),
        "producer": "auth_svc",
        "aggregate_id": str(user),
        "aggregate_version": 1,
        "position": position,
        "correlation_id": None,
        "causation_id": None,
        "data": {"user_id": str(user), "email": f"u{position}@example.com"},
    }
    body.update(over)
    return body


async def publish(
    amqp_url: str, bodies: list[bytes | dict[str, Any]], key: str = "auth.account.registered"
) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for body in bodies:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            await exchange.publish(aio_pika.Message(raw), routing_key=key)


async def dlq_depth(amqp_url: str, service: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            dead_letter_queue(service), durable=True, arguments={"x-queue-type": "quorum"}
        )
        return int(queue.declaration_result.message_count or 0)


@asynccontextmanager
async def consuming(
    amqp_url: str, service: str, handle: Callable[[Envelope], Any]
) -> AsyncIterator[Consumer]:
    consumer = Consumer(
        service=service,
        amqp_url=amqp_url,
        bindings={EXCHANGE: ["auth.account.*"]},
        handler=one_at_a_time(handle),
        delivery_limit=2,
        retry_delay_seconds=0.05,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    for _ in range(100):
        if consumer.status.role == "consuming":
            break
        await asyncio.sleep(0.05)
    try:
        yield consumer
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


@pytest.fixture
def service() -> str:
    return f"test_{uuid.uuid4().hex[:8]}"


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_messages_are_handled_in_order_and_poison_goes_to_the_dlq(
    amqp_url: str, service: str
) -> None:
    seen: list[int] = []

    async def handle(env: Envelope) -> Outcome:
        if env.data.get("email") == "boom@example.com":
            raise RuntimeError("handler cannot apply this one")
        seen.append(env.position)
        return "applied"

    async with consuming(amqp_url, service, handle):
        await publish(
            amqp_url,
            [
                envelope(1),
                b"{not json",
                envelope(2, data={"user_id": "not-a-uuid"}),  # fails its schema
                envelope(3),
                envelope(4, event_type="auth.account.brand_new"),  # unknown: skipped
                envelope(5, schema_version=9),  # newer version: skipped
                envelope(6, data={"user_id": str(uuid.uuid4()), "email": "boom@example.com"}),
                envelope(7),
            ],
        )
        await until(lambda: 7 in seen)
        # A one-at-a-time handler is idempotent by contract: one that failed in a batch is
        # retried alone, and those before it in that batch may be handled twice.
        assert list(dict.fromkeys(seen)) == [1, 3, 7]
    for _ in range(150):
        if await dlq_depth(amqp_url, service) == 3:
            break
        await asyncio.sleep(0.1)
    assert await dlq_depth(amqp_url, service) == 3  # not JSON, bad schema, handler failures


async def test_a_message_is_not_acked_until_its_handler_succeeds(
    amqp_url: str, service: str
) -> None:
    attempts: list[int] = []

    async def flaky(env: Envelope) -> Outcome:
        attempts.append(env.position)
        if len(attempts) == 1:
            raise RuntimeError("transient")
        return "applied"

    async with consuming(amqp_url, service, flaky):
        await publish(amqp_url, [envelope(10)])
        await until(lambda: len(attempts) == 2)
    assert attempts == [10, 10]
    assert await dlq_depth(amqp_url, service) == 0


class Batches:
    """A BatchHandler that records the size of every batch it is given."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    async def handle(self, events: Sequence[IncomingEvent]) -> Sequence[Outcome]:
        self.sizes.append(len(events))
        return ["applied"] * len(events)

    async def park(self, envelope: Envelope, reason: str) -> bool:
        return True

    async def attempts(self, envelopes: Sequence[Envelope], *, count: bool) -> dict[Any, int]:
        return {}


class Saturated(Coalescing):
    """A host whose CPUs are saturated all along (the signal itself: tests/unit/test_batching)."""

    def seconds(self) -> float:
        return self.busy_seconds


@pytest.mark.parametrize("coalesce", [0.0, 0.2])
async def test_steady_traffic_is_coalesced_into_batches_and_a_lone_event_goes_at_once(
    amqp_url: str, service: str, coalesce: float
) -> None:
    """Events arriving one by one, 20 ms apart, on a saturated host: with coalescing, several
    share a batch (one transaction); without, each is its own. After a quiet spell, the first
    event of a new burst is handled alone."""
    batches = Batches()
    consumer = Consumer(
        service=service,
        amqp_url=amqp_url,
        bindings={EXCHANGE: ["auth.account.*"]},
        handler=batches,
        coalesce_seconds=coalesce,
    )
    consumer.coalescing = Saturated(coalesce, service)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await until(lambda: consumer.status.role == "consuming")
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
            )
            for position in range(1, 31):
                body = json.dumps(envelope(position)).encode()
                await exchange.publish(aio_pika.Message(body), "auth.account.registered")
                await asyncio.sleep(0.02)
            await until(lambda: sum(batches.sizes) == 30)
            await asyncio.sleep(max(coalesce, 0.05) * 2)  # quiet
            lone = len(batches.sizes)
            body = json.dumps(envelope(31)).encode()
            await exchange.publish(aio_pika.Message(body), "auth.account.registered")
            await until(lambda: sum(batches.sizes) == 31)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
    assert batches.sizes[lone:] == [1]
    if coalesce:
        assert max(batches.sizes[:lone]) > 1 and len(batches.sizes[:lone]) < 30
    else:
        assert set(batches.sizes[:lone]) == {1}
