"""Filling a batch from an inbox of deliveries: what is queued, and what arrives soon after."""

from __future__ import annotations

import asyncio
from typing import TypeVar

T = TypeVar("T")

# Under steady traffic, a consumer takes a batch and a relay publishes at most once per this
# many seconds: what arrives meanwhile shares the transaction or the round of confirms.
COALESCE_SECONDS = 0.05


def drain(batch: list[T], inbox: asyncio.Queue[T], limit: int) -> None:
    """Move what `inbox` holds into `batch`, until `batch` has `limit` items."""
    while len(batch) < limit and not inbox.empty():
        batch.append(inbox.get_nowait())


async def fill(batch: list[T], inbox: asyncio.Queue[T], *, limit: int, linger: float) -> None:
    """`drain`, and keep draining what arrives within `linger` seconds, up to `limit`.

    For consumers of a backlog: applying a batch is quicker than the broker delivers its
    messages one by one, so taking only what is queued made batches of about ten events (a
    transaction and its round trips for every ten). A few milliseconds fill them.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + linger
    drain(batch, inbox, limit)
    while len(batch) < limit and loop.time() < deadline:
        await asyncio.sleep(0.002)
        drain(batch, inbox, limit)
