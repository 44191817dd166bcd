"""The consumer queues' delivery limit and dead-lettering come from RabbitMQ policies
(`esctl broker apply`, also run by `esctl db init`): they change on a running queue, and no
consumer setting makes a declare fail.

Each test has its own vhost, and names its consumer after a registered one (reporting_svc),
because `esctl broker apply` writes the policies of the registered consumer queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest

from servicekit import amqp
from servicekit.consumer import Consumer, one_at_a_time
from servicekit.messages import Outcome
from shared_contracts.envelope import Envelope
from shared_contracts.names import dead_letter_queue, live_queue
from testbed import cli
from tests.integration.test_consumer import EXCHANGE, envelope, publish, until

SERVICE = "reporting_svc"


def esctl(amqp_url: str, *args: str) -> str:
    result = cli.esctl(*args, env={**os.environ, "AMQP_URL": amqp_url})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


async def apply_policies(amqp_url: str, delivery_limit: int = amqp.BROKER_DELIVERY_LIMIT) -> None:
    """What `esctl broker apply` writes for SERVICE (without starting a process)."""
    policy = amqp.consumer_queue_policy(SERVICE, delivery_limit=delivery_limit)
    await amqp.apply_policies(amqp_url, [policy])


@contextlib.asynccontextmanager
async def running(
    amqp_url: str, handle: Callable[[Envelope], Any], *, delivery_limit: int = 5
) -> AsyncIterator[Consumer]:
    """A consumer of SERVICE's queue; leaving the block kills it (its connection drops with
    whatever it holds unacked, as when the process dies)."""
    consumer = Consumer(
        service=SERVICE,
        amqp_url=amqp_url,
        bindings={EXCHANGE: ["auth.account.*"]},
        handler=one_at_a_time(handle),
        delivery_limit=delivery_limit,
        retry_delay_seconds=0.05,
    )
    task = asyncio.create_task(consumer.run(asyncio.Event()))
    await until(lambda: consumer.status.role == "consuming" or task.done())
    assert not task.done(), task.exception()
    try:
        yield consumer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def dead_letters(amqp_url: str) -> list[str]:
    """The e-mail of each message in SERVICE's DLQ, and why RabbitMQ dead-lettered it."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(dead_letter_queue(SERVICE), passive=True)
        found = []
        while (message := await queue.get(fail=False, no_ack=False)) is not None:
            body = Envelope.model_validate_json(message.body)
            reason = (message.headers or {}).get("x-first-death-reason")
            found.append(f"{body.data['email']}: {reason}")
        return found  # not acked: back in the queue when the connection closes


class PoisonHandler:
    """Applies every event, except that one whose e-mail starts with `poison` hangs its
    handling: a stand-in for a message that kills the process every time."""

    def __init__(self) -> None:
        self.deliveries: Counter[str] = Counter()

    async def __call__(self, env: Envelope) -> Outcome:
        email = str(env.data["email"])
        self.deliveries[email] += 1
        if email.startswith("poison"):
            await asyncio.Event().wait()
        return "applied"

    async def kill_on_each_delivery(self, amqp_url: str, email: str, until_seen: int) -> None:
        """Start a consumer, wait for its next delivery of `email`, kill it; again until
        `email` has been delivered `until_seen` times."""
        while (seen := self.deliveries[email]) < until_seen:
            async with running(amqp_url, self):
                await until(lambda: self.deliveries[email] > seen)


def event(position: int, email: str) -> dict[str, Any]:
    return envelope(position, data={"user_id": str(uuid.uuid4()), "email": email})


async def test_a_delivery_limit_changed_by_policy_applies_to_the_running_queue(
    make_vhost: Callable[[], str],
) -> None:
    url = make_vhost()
    await apply_policies(url, delivery_limit=2)
    handler = PoisonHandler()

    # Limit 2: the third return of the message dead-letters it; it is not delivered again.
    async with running(url, handler):
        await publish(url, [event(1, "poison-1")])
        await until(lambda: handler.deliveries["poison-1"] == 1)
    await handler.kill_on_each_delivery(url, "poison-1", 3)
    assert await dead_letters(url) == ["poison-1: delivery_limit"]

    async with running(url, handler):
        # Raised on the running system, without redeclaring anything.
        await asyncio.to_thread(esctl, url, "broker", "apply", "--delivery-limit", "4")
        await publish(url, [event(2, "healthy")])
        await until(lambda: handler.deliveries["healthy"] == 1)
        await asyncio.sleep(0.5)  # its ack on the wire before the poison is taken
        await publish(url, [event(3, "poison-2")])
        await until(lambda: handler.deliveries["poison-2"] == 1)
    assert handler.deliveries["poison-1"] == 3

    # Limit 4: delivered a fourth and a fifth time (limit 2 would have stopped at three).
    await handler.kill_on_each_delivery(url, "poison-2", 5)
    async with running(url, handler):
        await publish(url, [event(4, "after")])
        await until(lambda: handler.deliveries["after"] == 1)
    assert handler.deliveries["poison-2"] == 5
    assert handler.deliveries["healthy"] == 1
    assert sorted(await dead_letters(url)) == [
        "poison-1: delivery_limit",
        "poison-2: delivery_limit",
    ]


async def test_restarting_with_another_consumer_delivery_limit_declares_the_same_queue(
    make_vhost: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    url = make_vhost()
    await apply_policies(url)
    handler = PoisonHandler()
    caplog.set_level(logging.WARNING, logger="servicekit.amqp")
    async with running(url, handler, delivery_limit=3):
        pass
    async with running(url, handler, delivery_limit=9):
        await publish(url, [event(1, "a")])
        await until(lambda: handler.deliveries["a"] == 1)
    assert not [r for r in caplog.records if "other x-arguments" in r.getMessage()]
    queue = await amqp.read_queue(url, live_queue(SERVICE))
    assert queue is not None
    assert queue["arguments"] == dict(amqp.CONSUMER_QUEUE_ARGUMENTS)
    assert queue["durable"] is True


async def test_a_queue_declared_with_x_arguments_by_an_older_build_keeps_working(
    make_vhost: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    url = make_vhost()
    older = {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": amqp.dead_letter_exchange(SERVICE),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(live_queue(SERVICE), durable=True, arguments=older)
    await apply_policies(url)
    handler = PoisonHandler()
    caplog.set_level(logging.WARNING, logger="servicekit.amqp")
    async with running(url, handler):
        await publish(url, [event(1, "a")])
        await until(lambda: handler.deliveries["a"] == 1)
    assert [r for r in caplog.records if "other x-arguments" in r.getMessage()]

    rows = await asyncio.to_thread(esctl, url, "broker", "policies", "--format", "json")
    row = next(r for r in json.loads(rows) if r["queue"] == live_queue(SERVICE))
    assert row["policy"] == f"{amqp.POLICY_PREFIX}{live_queue(SERVICE)}"
    assert row["delivery_limit"] == amqp.BROKER_DELIVERY_LIMIT
    assert row["overriding_arguments"] == [
        "x-dead-letter-exchange",
        "x-dead-letter-strategy",
        "x-delivery-limit",
        "x-overflow",
    ]
