"""The audit: a queue of its own bound to both exchanges, read directly from
the broker, that sees every event published; and re-publishing events as duplicates.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections import Counter
from typing import Any

import aio_pika

from servicekit.amqp import declare_producer_exchange
from shared_contracts.names import AUTH_EVENTS, PRODUCER_EXCHANGES, USER_EVENTS

AUDIT_QUEUE = "chaos.audit"


# -- the audit: what reached the exchanges ------------------------------------------------


class Audit:
    """A durable quorum queue bound to both exchanges, read on its own thread, directly from
    the broker (not through the proxy). Reconnects when the broker restarts; given several
    node URLs (comma-separated, a cluster), it moves to the next node when one fails."""

    def __init__(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url
        self._urls = [u.strip() for u in amqp_url.split(",") if u.strip()]
        self._node = 0
        # Keyed by producer and event id: an event id is unique per producer only (an
        # account and its profile share the aggregate id, so their first events share ids).
        self.envelopes: dict[tuple[str, str], dict[str, Any]] = {}
        self.copies: Counter[tuple[str, str]] = Counter()  # fresh deliveries seen
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> Audit:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the audit queue could not be declared")
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._consume(self._urls[self._node])
            except Exception:
                await asyncio.sleep(0.5)
            self._node = (self._node + 1) % len(self._urls)  # lost: try the next node

    async def _consume(self, url: str) -> None:
        connection = await aio_pika.connect(url, timeout=5)
        async with connection:
            closed = asyncio.Event()
            connection.close_callbacks.add(lambda *_: closed.set())
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=500)
            queue = await channel.declare_queue(
                AUDIT_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
            )
            for name in (AUTH_EVENTS, USER_EVENTS):
                await queue.bind(await declare_producer_exchange(channel, name), "#")
            self._ready.set()

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                body = json.loads(message.body)
                key = (body["producer"], body["event_id"])
                with self._lock:
                    self.envelopes.setdefault(key, body)
                    if not message.redelivered:
                        self.copies[key] += 1
                await message.ack()

            await queue.consume(on_message)
            while not self._stop.is_set() and not closed.is_set():
                await asyncio.sleep(0.1)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every distinct event seen, in position order per producer."""
        with self._lock:
            return sorted(self.envelopes.values(), key=lambda e: (e["producer"], e["position"]))

    def duplicates(self) -> int:
        with self._lock:
            return sum(c - 1 for c in self.copies.values() if c > 1)

    def find(self, event_type: str, email: str) -> dict[str, Any] | None:
        with self._lock:
            for env in self.envelopes.values():
                if env["event_type"] == event_type and env["data"].get("email") == email:
                    return env
        return None


async def inject_duplicates(
    amqp_url: str, envelopes: list[dict[str, Any]], *, seed: int = 1
) -> int:
    """Republish already published events, shuffled, as a broker redelivery or a relay
    re-send would: same ids, old positions, out of order."""
    sample = list(envelopes)
    random.Random(seed).shuffle(sample)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchanges = {
            n: await declare_producer_exchange(channel, n) for n in PRODUCER_EXCHANGES.values()
        }
        for env in sample:
            await exchanges[PRODUCER_EXCHANGES[env["producer"]]].publish(
                aio_pika.Message(
                    json.dumps(env).encode(),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=env["event_id"],
                    type=env["event_type"],
                    headers={"x-position": env["position"]},
                ),
                routing_key=env["event_type"],
            )
    return len(sample)
