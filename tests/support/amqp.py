"""Reading what actually arrived on an exchange, the way any subscriber would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage


@dataclass
class Received:
    messages: list[AbstractIncomingMessage] = field(default_factory=list)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(m.body) for m in self.messages]

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.bodies

    async def wait_for_positions(self, positions: set[int], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = {b["position"] for b in self.bodies}
            if positions <= seen:
                return
            await asyncio.sleep(0.05)
        missing = positions - {b["position"] for b in self.bodies}
        raise AssertionError(f"{len(missing)} positions never arrived, e.g. {sorted(missing)[:5]}")


@asynccontextmanager
async def subscribed(
    amqp_url: str, exchange: str, routing_key: str = "#"
) -> AsyncIterator[Received]:
    """Bind a private queue to `exchange` (declaring it if needed) and collect what arrives."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_exchange(
            exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(declared, routing_key=routing_key)
        received = Received()

        async def on_message(message: AbstractIncomingMessage) -> None:
            received.messages.append(message)
            await message.ack()

        await queue.consume(on_message)
        yield received
    finally:
        # A fault test may have closed this connection under us: that is not a failure.
        with contextlib.suppress(Exception):
            await connection.close()
