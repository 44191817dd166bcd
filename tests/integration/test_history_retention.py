"""events.history's retention by age (issue 13): `esctl broker apply` writes a policy with
`HISTORY_MAX_AGE` and `HISTORY_SEGMENT_BYTES`, and once the bound has passed (and newer
segments have begun) the old messages are gone from the stream. It is the erasure bound for
personal data published to the stream. A scratch vhost, a 2-second bound, tiny segments."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable

import aio_pika

from servicekit import amqp
from shared_contracts.names import HISTORY_STREAM
from testbed.cli import esctl

BOUND_SECONDS = 2


async def publish(url: str, label: str, count: int) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()  # publisher confirms
        await amqp.declare_history_stream(channel)
        for i in range(count):
            body = json.dumps({"label": label, "i": i, "pad": "x" * 200}).encode()
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=HISTORY_STREAM,
            )


async def read_from_first(url: str) -> list[str]:
    """Every message's label, reading the stream from its first retained offset."""
    connection = await aio_pika.connect(url)
    labels: list[str] = []
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.declare_queue(HISTORY_STREAM, passive=True)
        async with queue.iterator(arguments={"x-stream-offset": "first"}) as messages:
            while True:
                try:
                    message = await asyncio.wait_for(messages.__anext__(), timeout=2)
                except TimeoutError:
                    break
                labels.append(json.loads(message.body)["label"])
                await message.ack()
    return labels


async def test_old_messages_leave_events_history_once_its_max_age_has_passed(
    make_vhost: Callable[[], str],
) -> None:
    url = make_vhost()
    env = {
        **os.environ,
        "AMQP_URL": url,
        "HISTORY_MAX_AGE": f"{BOUND_SECONDS}s",
        "HISTORY_SEGMENT_BYTES": "4000",  # about ten messages a segment
    }
    applied = await asyncio.to_thread(esctl, "broker", "apply", env=env)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "max-age 2s" in applied.stdout

    await publish(url, "old", 100)
    assert (await read_from_first(url)).count("old") == 100
    await asyncio.sleep(BOUND_SECONDS + 1.5)
    await publish(url, "newer", 100)  # new segments: retention acts as each one begins
    await asyncio.sleep(BOUND_SECONDS + 1.5)
    await publish(url, "newest", 100)  # the segment where "old" met "newer" goes too

    labels = await read_from_first(url)
    assert "old" not in labels
    assert labels.count("newest") == 100


async def test_a_malformed_history_max_age_is_refused_in_one_line(
    make_vhost: Callable[[], str],
) -> None:
    env = {**os.environ, "AMQP_URL": make_vhost(), "HISTORY_MAX_AGE": "7 days"}
    result = await asyncio.to_thread(esctl, "broker", "apply", env=env)
    assert result.returncode == 1
    assert "history_max_age" in result.stderr and "Traceback" not in result.stderr
