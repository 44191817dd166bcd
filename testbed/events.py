"""Helpers for the side-effect services' tests: single envelopes, running a worker, waiting."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Protocol

from shared_contracts.envelope import event_id_for
from shared_contracts.names import PRODUCER_EXCHANGES


def envelope(
    event_type: str,
    user: uuid.UUID,
    *,
    version: int,
    position: int,
    data: dict[str, Any] | None = None,
) -> tuple[str, str, bytes]:
    """(exchange, routing key, body) of one public event about `user`."""
    producer = "auth_svc" if event_type.startswith("auth.") else "user_svc"
    body = {
        "event_id": str(event_id_for(producer, user, version)),
        "event_type": event_type,
        "schema_version": 1,
        "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "producer": producer,
        "aggregate_id": str(user),
        "aggregate_version": version,
        "position": position,
        "correlation_id": str(uuid.uuid4()),
        "causation_id": None,
        "data": {"user_id": str(user), **(data or {})},
    }
    return PRODUCER_EXCHANGES[producer], event_type, json.dumps(body).encode()


def event_id(message: tuple[str, str, bytes]) -> uuid.UUID:
    return uuid.UUID(json.loads(message[2])["event_id"])


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float = 15.0,
    what: str = "condition",
    poll: float = 0.05,
) -> None:
    """Poll `check` every `poll` seconds until it is true; fail with `what` after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(poll)


class Worker(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...

    def ready(self) -> bool: ...


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[None]:
    """Run a consumer-and-dispatcher worker in this loop until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await eventually(lambda: worker.ready() or task.done(), what="the consumer to start")
        if task.done():
            task.result()
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)
