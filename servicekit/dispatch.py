"""The base of a dispatcher: carries out the intents a projection records, beside its consumer.

A projection records intents (mails, webhooks) in its batch's transaction and NOTIFYs a
channel; the dispatcher LISTENs there, claims what is due, sends, and marks the outcome. This
class keeps what every dispatcher shares: its connection pool, the LISTEN loop that wakes it,
and a run loop that waits out a lost database. Subclasses implement `_dispatch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from servicekit.aio import sleep_unless_stopped
from servicekit.eventstore import connection_kwargs

log = logging.getLogger("servicekit.dispatch")


class IntentDispatcher:
    """Construct, then `await run(stop)`. `status` needs `role` and `last_error`."""

    status: Any

    def __init__(self, *, name: str, database_url: str, channel: str, pool_size: int) -> None:
        self.name = name
        self.database_url = database_url
        self.channel = channel
        self.pool = AsyncConnectionPool(
            kwargs=connection_kwargs(database_url),
            min_size=1,
            max_size=pool_size,
            open=False,
            name=name,
        )
        self._wake = asyncio.Event()  # new intents were recorded

    async def run(self, stop: asyncio.Event) -> None:
        async with self.pool:
            listener = asyncio.create_task(self._listen(stop))
            try:
                while not stop.is_set():
                    try:
                        await self._dispatch(stop)
                    except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
                        self.status.role = "reconnecting"
                        self.status.last_error = f"database unavailable: {exc}"
                        log.warning("%s lost its database; retrying", self.name)
                        await sleep_unless_stopped(stop, 1.0)
            finally:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
                await self._closing()
                self.status.role = "stopped"

    async def _dispatch(self, stop: asyncio.Event) -> None:
        raise NotImplementedError

    async def _closing(self) -> None:
        """Release what the subclass holds (e.g. HTTP clients)."""

    async def _listen(self, stop: asyncio.Event) -> None:
        """Wake the dispatcher when a transaction that recorded intents commits."""
        while not stop.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(
                    **connection_kwargs(self.database_url), autocommit=True
                )
                async with conn:
                    await conn.execute(
                        psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self.channel))
                    )
                    self._wake.set()  # intents may have been recorded while we were away
                    async for _ in conn.notifies():
                        self._wake.set()
            except (psycopg.Error, OSError):
                await sleep_unless_stopped(stop, 1.0)
