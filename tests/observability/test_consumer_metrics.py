"""Lag and dead-letter-queue metrics of a consumer stopped, fed, and restarted (real broker)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import aio_pika
from prometheus_client import REGISTRY

from servicekit.consumer import Consumer
from servicekit.messages import IncomingEvent, Outcome
from shared_contracts.envelope import Envelope, event_id_for
from shared_contracts.events import AccountRegistered
from shared_contracts.names import AUTH_EVENTS

STOPPED_SECONDS = 1.5


class GatedHandler:
    """Applies whatever it is given, once the test opens the gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.applied: list[int] = []

    async def handle(self, events: Sequence[IncomingEvent]) -> Sequence[Outcome]:
        await self.gate.wait()
        self.applied += [e.envelope.position for e in events]
        return ["applied"] * len(events)

    async def park(self, envelope: Envelope, reason: str) -> None:
        pass


def gauge(name: str, service: str, producer: str | None = None) -> float:
    labels = {"service": service} | ({"producer": producer} if producer else {})
    value = REGISTRY.get_sample_value(name, labels)
    return -1.0 if value is None else value


async def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def publish(amqp_url: str, positions: range, *, poison: bool = False) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            AUTH_EVENTS, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for position in positions:
            user = uuid.uuid4()
            envelope = Envelope(
                event_id=event_id_for("auth_svc", user, 1),
                event_type=AccountRegistered.event_type,
                schema_version=1,
                occurred_at=datetime.now(UTC),
                producer="auth_svc",
                aggregate_id=user,
                aggregate_version=1,
                position=position,
                data=AccountRegistered(user_id=user, email=f"u{position}@example.com").model_dump(
                    mode="json"
                ),
            )
            await exchange.publish(
                aio_pika.Message(envelope.model_dump_json().encode()),
                routing_key=AccountRegistered.event_type,
            )
        if poison:
            await exchange.publish(
                aio_pika.Message(b"not an envelope"), routing_key=AccountRegistered.event_type
            )


async def test_lag_and_dlq_depth_move_when_a_consumer_is_stopped_and_restarted(
    make_vhost: Callable[[], str],
) -> None:
    amqp_url = make_vhost()
    service = f"lag_{uuid.uuid4().hex[:6]}"
    handler = GatedHandler()

    def consumer() -> Consumer:
        return Consumer(
            service=service,
            amqp_url=amqp_url,
            bindings={AUTH_EVENTS: [AccountRegistered.event_type]},
            handler=handler,
            prefetch=100,
            depth_poll_seconds=0.05,
        )

    # Running and caught up: nothing waits, nothing is dead-lettered.
    handler.gate.set()
    first, stop = consumer(), asyncio.Event()
    task = asyncio.create_task(first.run(stop))
    await wait_until(lambda: first.status.role == "consuming")
    await publish(amqp_url, range(1, 3))
    await wait_until(lambda: handler.applied == [1, 2])
    await wait_until(lambda: gauge("consumer_lag_events", service) == 0)
    assert gauge("consumer_dlq_messages", service) == 0
    stop.set()
    await task

    # Stopped: events pile up in its queue (one of them poison), and age.
    await publish(amqp_url, range(3, 13), poison=True)
    await asyncio.sleep(STOPPED_SECONDS)

    # Restarted, handler held: the whole backlog (poison included) shows as lag.
    handler.gate.clear()
    second, stop = consumer(), asyncio.Event()
    task = asyncio.create_task(second.run(stop))
    try:
        await wait_until(lambda: gauge("consumer_lag_events", service) == 11)
        assert gauge("consumer_dlq_messages", service) == 0
        assert handler.applied == [1, 2]

        # Let it catch up: lag back to zero, the poison counted in the DLQ, where it stays.
        handler.gate.set()
        await wait_until(lambda: handler.applied == list(range(1, 13)))
        await wait_until(lambda: gauge("consumer_lag_events", service) == 0)
        await wait_until(lambda: gauge("consumer_dlq_messages", service) == 1)
        # The last event handled had waited at least as long as the consumer was down.
        assert gauge("consumer_lag_seconds", service, "auth_svc") >= STOPPED_SECONDS
        assert (
            REGISTRY.get_sample_value(
                "consumer_messages_total", {"service": service, "outcome": "dead_lettered"}
            )
            == 1
        )
    finally:
        handler.gate.set()
        stop.set()
        await task
