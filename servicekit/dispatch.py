"""Dispatching intents: what the mail and webhook dispatchers share.

A projection records intents (mails, webhooks) in its batch's transaction and NOTIFYs a
channel; the dispatcher LISTENs there, claims what is due, sends, and marks the outcome.
`IntentDispatcher` keeps the loop every dispatcher shares: its connection pool, the LISTEN
loop that wakes it, and a run loop that waits out a lost database; subclasses implement
`_dispatch`. Beside it, the pieces each one sends with: a `CircuitBreaker` (one for the SMTP
server, one per webhook endpoint), a `TokenBucket` rate limit, the `RetrySchedule`, the
`DispatcherStatus` that /status shows, and `expire_intents`, the query that fails what waited
past its retry window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from servicekit.eventstore import connection_kwargs
from servicekit.supervise import sleep_unless_stopped

log = logging.getLogger("servicekit.dispatch")

BreakerState = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    """closed -> open after `threshold` failures in a row -> half-open after `cooldown`
    (one probe) -> closed on its success, open again on its failure.

    Times are the caller's monotonic clock (the event loop's)."""

    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0  # in a row
        self.opened_at: float | None = None

    def state(self, now: float) -> BreakerState:
        if self.opened_at is None:
            return "closed"
        return "open" if now < self.opened_at + self.cooldown else "half-open"

    @property
    def probe_at(self) -> float | None:
        """When the breaker lets a probe through (None while closed)."""
        return None if self.opened_at is None else self.opened_at + self.cooldown

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = now  # a failed probe (or a late failure) starts the cooldown again


class TokenBucket:
    """`rate` requests per second on average, bursts of up to `rate` (at least 1)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.tokens = self.capacity
        self.updated: float | None = None  # full until the first request

    def reserve(self, now: float) -> float:
        """Take a token at `now` (a monotonic clock); the seconds to wait before using it."""
        if self.updated is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


@dataclass(frozen=True)
class RetrySchedule:
    """Exponential backoff with jitter, capped at `maximum`, until `window` seconds have
    passed since the intent's window opened (its creation, or a redelivery)."""

    initial: float
    maximum: float
    window: float

    def delay(self, attempt: int) -> float:
        """The wait after attempt `attempt` failed: about initial * 2^(attempt-1), capped at
        `maximum`, then jittered down to 50-100% so that retries of one outage spread out."""
        ceiling = min(self.initial * 2 ** max(attempt - 1, 0), self.maximum)
        return float(ceiling * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret

    def allows(self, window_start: datetime, delay: float, now: datetime) -> bool:
        """Whether an attempt `delay` seconds after `now` still falls inside the window."""
        return now + timedelta(seconds=delay) <= window_start + timedelta(seconds=self.window)

    def retry_in(
        self, attempt: int, window_start: datetime, now: datetime | None = None
    ) -> float | None:
        """The delay before the next attempt, or None when it would fall past the window."""
        delay = self.delay(attempt)
        return delay if self.allows(window_start, delay, now or datetime.now(UTC)) else None


@dataclass(kw_only=True)
class DispatcherStatus:
    """What /status shows of a dispatcher; each one adds its own fields (what it sent to)."""

    role: str = "starting"  # starting | dispatching | reconnecting | stopped
    retried: int = 0  # attempts failed and scheduled again
    failed: int = 0  # intents failed for good
    last_error: str | None = None


async def expire_intents(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    *,
    window_start: str,
    never: str,
    window: float,
) -> int:
    """Fail the pending intents of `public.<table>` whose retry window (`window` seconds from
    the column `window_start`) ended while they waited, e.g. behind an open breaker. The
    table has the columns every intent table has: status, next_attempt_at, last_error;
    `never` stands for the last error of an intent never tried."""
    cur = await conn.execute(
        sql.SQL(
            "UPDATE {table} SET status = 'failed', "
            "last_error = 'retry window ended: ' || coalesce(last_error, %s) "
            "WHERE status = 'pending' AND next_attempt_at <= now() "
            "AND {window_start} + make_interval(secs => %s) < now()"
        ).format(table=sql.Identifier("public", table), window_start=sql.Identifier(window_start)),
        (never, window),
    )
    return cur.rowcount


class IntentDispatcher:
    """Construct, then `await run(stop)`. A subclass sets `status` before running."""

    status: DispatcherStatus

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
